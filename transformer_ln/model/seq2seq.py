"""Encoder-decoder Transformer built from ``Sublayer``s; the residual scheme is a build-time choice.

Sub-layer order (the paper's numbering, starting at 1 in each stack): encoder layer l holds self-attention (2l+1)
and FFN (2l+2); decoder layer l holds causal self-attention (3l+1), cross-attention (3l+2) and FFN (3l+3).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .layers import CrossAttention, FeedForward, SelfAttention, _Attention
from .norms import is_norm, uses_batch_statistics
from .positions import PositionalEmbedding, Rotary, positions_of
from .schemes import Residual, ResidualScheme, Site, Sublayer, get_scheme, scheme_from_config

if TYPE_CHECKING:  # the model reads a ModelConfig's fields; it never imports the config package
    from ..config.run_config import ModelConfig


def _scheme(residual: str | ResidualScheme, options: dict) -> ResidualScheme:
    if isinstance(residual, ResidualScheme):
        if options:
            raise ValueError(f"scheme option(s) {', '.join(sorted(options))} given with a built scheme "
                             f"{residual!r}; build it with them (get_scheme(name, **options))")
        return residual
    return get_scheme(residual, **options)


def _sites(stack: str, kinds: tuple[str, ...], layer_index: int, d_model: int, n_sublayers: int | None,
           depths: tuple[int, int] | None, scheme: ResidualScheme, causal: bool = False) -> list[Site]:
    """The ``Site`` of each sub-layer of layer ``layer_index``; ``depths`` = (encoder, decoder) layer counts.

    A standalone layer (no ``depths``) of a scheme whose constants come from the model's depths (DeepNorm, Sub-LN,
    T-Fixup: ``needs_depths``) or from its stack's size (Admin's closed forms: ``needs_stack_size``) is refused in one
    line saying what to pass, rather than given the constants of a 1-layer model. ``causal``: a decoder-only layer,
    whose stack has no encoder, so ``n_sublayers`` = 2 M alone gives its depths (0, M).
    """
    per_layer = len(kinds)
    if depths is None and causal and n_sublayers:
        depths = (0, max(1, n_sublayers // per_layer))
    what = ("depths=(0, M) or n_sublayers=2M for a decoder-only stack of M layers" if causal else
            f"depths=(N, M), the encoder and decoder layer counts of the model this {stack} layer belongs to")
    if depths is None and scheme.needs_depths():
        raise ValueError(f"{scheme!r} computes its constants from the model's depth; give {what}")
    if n_sublayers is None and depths is None and scheme.needs_stack_size():
        raise ValueError(f"{scheme!r} computes its constants from the stack's number of residual sub-layers; give "
                         + (what if causal else f"n_sublayers= ({per_layer} per {stack} layer times the layers) "
                                                "or depths=(N, M)"))
    if depths is None:  # a scheme without depth-dependent constants: the layer counts only itself
        n = max(1, (n_sublayers or per_layer) // per_layer)
        depths = (0, n) if causal else (n, n)
    n_enc, n_dec = depths
    n_sub = n_sublayers or per_layer * (n_enc if stack == "encoder" else n_dec)
    return [Site(stack, kind, layer_index, per_layer * layer_index + k + 1, n_enc, n_dec, d_model, n_sub)
            for k, kind in enumerate(kinds)]


class _Layer(nn.Module):
    def _finish(self, scheme: ResidualScheme, init: bool) -> None:
        self.batch_stats = uses_batch_statistics(self)
        if init and scheme.custom_init:  # a standalone layer starts as its scheme says
            init_weights(self)


class EncoderLayer(_Layer):
    """Self-attention then FFN, each a residual ``Sublayer`` of the chosen scheme.

    ``residual`` is a scheme name or a built ``ResidualScheme``; further keyword arguments are the scheme's options
    (``norm="rmsnorm"``, Admin's ``admin_omega="O(logn)"``). ``depths`` = (encoder layers, decoder layers) of the
    model the layer belongs to and ``layer_index`` its place (depth-dependent schemes read them); ``n_sublayers``
    overrides the stack's sub-layer count (Admin's n). Left as None, the layer counts only its own two. With
    ``init`` a scheme with its own initialisation (DeepNorm, Sub-LN, T-Fixup) applies it on construction; the model
    passes False and initialises as a whole.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attn_dropout: float = 0.0,
                 act_dropout: float = 0.0, activation: str = "relu", residual: str | ResidualScheme = "post_ln",
                 n_sublayers: int | None = None, *, layer_index: int = 0, depths: tuple[int, int] | None = None,
                 init: bool = True, bias: bool = True, **scheme_options):
        super().__init__()
        scheme = _scheme(residual, scheme_options)
        s_attn, s_ffn = _sites("encoder", ("self_attn", "ffn"), layer_index, d_model, n_sublayers, depths,
                                scheme)
        self.self_attn = scheme.build_sublayer(SelfAttention(d_model, n_heads, attn_dropout, bias), s_attn, dropout)
        self.ffn = scheme.build_sublayer(FeedForward(d_model, d_ff, act_dropout, activation, bias), s_ffn, dropout)
        self._finish(scheme, init)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                keep: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        """x: (B, S, D); mask: bool (B, 1, 1, S), True for real (non-pad) source tokens.

        ``keep`` (B, S) marks the real tokens for BatchNorm's statistics; by default taken from ``mask``. ``rope``:
        rotary (cos, sin) tables of the positions (``model.positions=rope``).
        """
        if keep is None and self.batch_stats and self.training and mask is not None and mask.dim() == 4:
            keep = mask[:, 0, 0, :]
        kw = {} if keep is None else {"keep": keep}
        return self.ffn(self.self_attn(x, mask, **kw, **_rope(rope)), **kw)


class DecoderLayer(_Layer):
    """Causal self-attention, cross-attention to the encoder output, FFN (3 residual sub-layers).

    Arguments as ``EncoderLayer``.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attn_dropout: float = 0.0,
                 act_dropout: float = 0.0, activation: str = "relu", residual: str | ResidualScheme = "post_ln",
                 n_sublayers: int | None = None, *, layer_index: int = 0, depths: tuple[int, int] | None = None,
                 init: bool = True, bias: bool = True, **scheme_options):
        super().__init__()
        scheme = _scheme(residual, scheme_options)
        s_self, s_cross, s_ffn = _sites("decoder", ("self_attn", "cross_attn", "ffn"), layer_index, d_model,
                                        n_sublayers, depths, scheme)
        self.self_attn = scheme.build_sublayer(SelfAttention(d_model, n_heads, attn_dropout, bias), s_self, dropout)
        self.cross_attn = scheme.build_sublayer(CrossAttention(d_model, n_heads, attn_dropout, bias), s_cross,
                                                dropout)
        self.ffn = scheme.build_sublayer(FeedForward(d_model, d_ff, act_dropout, activation, bias), s_ffn, dropout)
        self._finish(scheme, init)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                cache: dict | None = None, keep: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        """y: (B, T, D); memory: (B, S, D) final encoder output; cache: per-layer dict for incremental decoding;
        keep: (B, T) real target tokens, for BatchNorm's statistics in training; rope: as ``EncoderLayer``."""
        kw = {} if keep is None else {"keep": keep}
        y = self.self_attn(y, None, True, cache=None if cache is None else cache.setdefault("self", {}), **kw,
                           **_rope(rope))
        y = self.cross_attn(y, memory, memory_mask, cache=None if cache is None else cache.setdefault("cross", {}),
                            **kw)
        return self.ffn(y, **kw)


def _rope(rope) -> dict:
    return {} if rope is None else {"rope": rope}


def _layer_kwargs(cfg: ModelConfig, scheme: ResidualScheme, depths: tuple[int, int] | None = None) -> dict:
    return dict(d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff, dropout=cfg.dropout,
                attn_dropout=cfg.attn_dropout, act_dropout=cfg.act_dropout, activation=cfg.activation,
                residual=scheme, depths=depths or (cfg.n_enc_layers, cfg.n_dec_layers), init=False, bias=cfg.bias)


class _Stack(nn.Module):
    """What every stack has: token embedding with positions (``model.positions``) and, for rope, the rotary
    tables it hands its self-attentions."""

    def _embedding(self, cfg: ModelConfig, embed_tokens: nn.Embedding) -> None:
        self.embed = PositionalEmbedding(embed_tokens, cfg.max_positions, cfg.dropout, cfg.positions,
                                         cfg.scale_embeddings)
        self.rotary = Rotary(cfg.d_model // cfg.n_heads, cfg.rope_theta) if cfg.positions == "rope" else None

    def rope(self, offset: int | torch.Tensor, length: int, x: torch.Tensor):
        """(cos, sin) for ``length`` tokens from ``offset``, or None without rotary positions."""
        if self.rotary is None:
            return None
        return self.rotary(positions_of(offset, length, x.device), x.dtype)


class Encoder(_Stack):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding, scheme: ResidualScheme):
        super().__init__()
        self.scheme = scheme
        self._embedding(cfg, embed_tokens)
        kw = _layer_kwargs(cfg, scheme)
        self.layers = nn.ModuleList(EncoderLayer(**kw, layer_index=i) for i in range(cfg.n_enc_layers))
        self.final_norm = scheme.stack_norm(cfg.d_model)
        self.batch_stats = uses_batch_statistics(self)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        keep = mask[:, 0, 0, :] if self.batch_stats and self.training and mask is not None else None
        x0 = self.embed(src)
        rope = self.rope(0, src.shape[1], x0)
        x = self.scheme.begin(x0)
        for layer in self.layers:
            x = layer(x, mask, keep, rope)
        return self.scheme.end(x, self.final_norm, keep)


class DecoderCache:
    """Keys and values of every decoder layer for incremental decoding; ``reorder`` follows beam search."""

    def __init__(self, n_layers: int):
        self.layers: list[dict] = [{} for _ in range(n_layers)]
        self.length = 0

    def reorder(self, index: torch.Tensor, cross: bool = True) -> None:
        """Keep rows ``index`` of every cached tensor (beam search re-ranks hypotheses each step).

        ``cross=False`` leaves the encoder keys/values alone: reordering beams within their sentences does not
        change them, since all beams of a sentence share them.
        """
        for layer in self.layers:
            for name, part in layer.items():
                if cross or name != "cross":
                    for k in part:
                        part[k] = part[k].index_select(0, index)

    def offset(self) -> int | torch.Tensor:
        """Position of the next token fed to the decoder."""
        return self.length


class StaticDecoderCache(DecoderCache):
    """Preallocated self-attention keys/values for ``rows`` hypotheses and ``max_len`` positions.

    Why: shapes and addresses never change from step to step, so a decoding step can be captured once in a CUDA
    graph and replayed (a step of a small batch is otherwise bound by kernel launches). The caller sets ``pos``
    (positions of the tokens fed next, a device tensor) before each step; nothing here reads it on the host.
    ``reorder`` copies in place, keeping addresses.
    """

    def __init__(self, n_layers: int, rows: int, max_len: int, n_heads: int, d_head: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__(n_layers)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        slots = torch.arange(max_len, device=device)
        for layer in self.layers:
            layer["self"] = {name: torch.zeros(rows, n_heads, max_len, d_head, dtype=dtype, device=device)
                             for name in ("k", "v")}
            layer["self"].update(slots=slots, pos=self.pos)

    def reorder(self, index: torch.Tensor, cross: bool = False) -> None:
        """Rows ``index`` of the keys and values, in place. The rows never leave: the encoder side stays."""
        for layer in self.layers:
            for name in ("k", "v"):
                buf = layer["self"][name]
                buf.copy_(buf.index_select(0, index))

    def offset(self) -> torch.Tensor:
        return self.pos


class Decoder(_Stack):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding, scheme: ResidualScheme):
        super().__init__()
        self.scheme, self.pad_id = scheme, cfg.pad_id
        self._embedding(cfg, embed_tokens)
        kw = _layer_kwargs(cfg, scheme)
        self.layers = nn.ModuleList(DecoderLayer(**kw, layer_index=i) for i in range(cfg.n_dec_layers))
        self.final_norm = scheme.stack_norm(cfg.d_model)
        self.batch_stats = uses_batch_statistics(self)

    def forward(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                cache: DecoderCache | None = None) -> torch.Tensor:
        offset = 0 if cache is None else cache.offset()
        keep = tgt_in.ne(self.pad_id) if self.batch_stats and self.training else None
        y0 = self.embed(tgt_in, offset)
        rope = self.rope(offset, tgt_in.shape[1], y0)
        y = self.scheme.begin(y0)
        for i, layer in enumerate(self.layers):
            y = layer(y, memory, memory_mask, None if cache is None else cache.layers[i], keep, rope)
        if cache is not None:
            cache.length += tgt_in.shape[1]
        return self.scheme.end(y, self.final_norm, keep)


class Seq2SeqTransformer(nn.Module):
    """The encoder-decoder. ``model(src, tgt_in)`` -> logits (B, T, tgt_vocab_size).

    The output projection is the target embedding (``tie_embeddings``, the default) or a matrix of its own
    (``output_proj``); with ``share_embeddings`` the source embedding is the target's too. Tokens equal to ``pad_id`` in ``src`` are masked as keys; the decoder's self-attention is causal
    (targets are right-padded, so a real token never sees a pad).
    """

    _no_split_modules = ["EncoderLayer", "DecoderLayer"]  # FSDP units (accelerate's transformer-based wrap)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.src_vocab_size is None or cfg.tgt_vocab_size is None:
            raise ValueError("model.src_vocab_size / model.tgt_vocab_size: unset; give both (the trainer fills "
                             "them from the tokenizer)")
        self.cfg = cfg
        self.scheme = scheme_from_config(cfg)
        tgt_embed = nn.Embedding(cfg.tgt_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        src_embed = tgt_embed if cfg.share_embeddings else nn.Embedding(cfg.src_vocab_size, cfg.d_model,
                                                                        padding_idx=cfg.pad_id)
        self.encoder = Encoder(cfg, src_embed, self.scheme)
        self.decoder = Decoder(cfg, tgt_embed, self.scheme)
        if not cfg.tie_embeddings:
            self.output_proj = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        init_weights(self)

    def output_weight(self) -> torch.Tensor:
        """The (V, D) matrix that turns the last hidden states into logits."""
        proj = getattr(self, "output_proj", None)
        return self.decoder.embed.embed_tokens.weight if proj is None else proj.weight

    def key_mask(self, src: torch.Tensor) -> torch.Tensor:
        """(B, S) tokens -> bool (B, 1, 1, S), True where the key is a real token."""
        return src.ne(self.cfg.pad_id)[:, None, None, :]

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """src: int64 (B, S) -> encoder output (B, S, D)."""
        return self.encoder(src, self.key_mask(src))

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src: torch.Tensor,
               cache: DecoderCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) for ``tgt_in`` given the encoder output; with ``cache`` only the new tokens are fed.

        ``last_only`` projects only the last position (B, 1, V): search needs no more, and the vocabulary projection
        of a whole prefix is the largest matrix product of a decoding step.
        """
        y = self.decoder(tgt_in, memory, self.key_mask(src), cache)
        if last_only:
            y = y[:, -1:]
        return F.linear(y, self.output_weight())

    def new_cache(self) -> DecoderCache:
        return DecoderCache(len(self.decoder.layers))

    def new_static_cache(self, rows: int, max_len: int, dtype: torch.dtype | None = None,
                         device: torch.device | None = None) -> StaticDecoderCache:
        """A fixed-shape cache for ``rows`` hypotheses of up to ``max_len`` positions (CUDA-graph decoding)."""
        w = self.decoder.embed.embed_tokens.weight
        return StaticDecoderCache(len(self.decoder.layers), rows, max_len, self.cfg.n_heads,
                                  self.cfg.d_model // self.cfg.n_heads, dtype or w.dtype, device or w.device)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src), src)


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """The reference initialisation (fairseq as used by Transformer-Clinic), then each scheme's own hook.

    Linears xavier-uniform with zero bias; each d x d block of the q/k/v projections xavier-uniform with gain
    1/sqrt(2) (as fairseq's fused in_proj); embeddings N(0, d^-1/2) with a zero pad row; norms at their initial
    values (LayerNorm gain 1, bias 0); residual combiners (Admin's omega, ReZero's alpha) at their scheme's initial
    value. Then ``scheme.init_sublayer`` on every sub-layer and, for a whole model, ``scheme.init_model``.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=m.embedding_dim ** -0.5)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif is_norm(m) or (isinstance(m, Residual) and hasattr(m, "reset_parameters")):
            m.reset_parameters()
    for m in model.modules():
        if isinstance(m, _Attention):
            for lin in m.in_projections():
                d_in = lin.weight.shape[1]
                for block in lin.weight.split(d_in, dim=0):
                    nn.init.xavier_uniform_(block, gain=1 / math.sqrt(2))
    for m in model.modules():
        if isinstance(m, Sublayer) and m.scheme is not None:
            m.scheme.init_sublayer(m)
    scheme = getattr(model, "scheme", None)
    if isinstance(scheme, ResidualScheme):
        scheme.init_model(model)
