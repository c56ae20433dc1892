"""Encoder-decoder Transformer built from ``Sublayer``s; the residual scheme is a build-time choice.

Sub-layer order (the paper's numbering, starting at 1 in each stack): encoder layer l holds self-attention (2l+1)
and FFN (2l+2); decoder layer l holds causal self-attention (3l+1), cross-attention (3l+2) and FFN (3l+3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import CrossAttention, FeedForward, PositionalEmbedding, SelfAttention, _Attention
from .residual import OmegaResidual, ResidualScheme, Sublayer, get_scheme


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each a residual ``Sublayer`` of the chosen scheme.

    ``n_sublayers`` is the stack's number of residual sub-layers (2 per encoder layer); Admin's closed-form omega
    depends on it. Left as None, the layer counts only its own two.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attn_dropout: float = 0.0,
                 act_dropout: float = 0.0, activation: str = "relu", residual: str | ResidualScheme = "post_ln",
                 n_sublayers: int | None = None, admin_omega: str = "profile"):
        super().__init__()
        scheme = get_scheme(residual) if isinstance(residual, str) else residual
        n = n_sublayers or 2
        self.self_attn = Sublayer(SelfAttention(d_model, n_heads, attn_dropout), d_model, scheme, n, dropout,
                                  admin_omega)
        self.ffn = Sublayer(FeedForward(d_model, d_ff, act_dropout, activation), d_model, scheme, n, dropout,
                            admin_omega)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, S, D); mask: bool (B, 1, 1, S), True for real (non-pad) source tokens."""
        return self.ffn(self.self_attn(x, mask))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder output, FFN (3 residual sub-layers)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attn_dropout: float = 0.0,
                 act_dropout: float = 0.0, activation: str = "relu", residual: str | ResidualScheme = "post_ln",
                 n_sublayers: int | None = None, admin_omega: str = "profile"):
        super().__init__()
        scheme = get_scheme(residual) if isinstance(residual, str) else residual
        n = n_sublayers or 3
        self.self_attn = Sublayer(SelfAttention(d_model, n_heads, attn_dropout), d_model, scheme, n, dropout,
                                  admin_omega)
        self.cross_attn = Sublayer(CrossAttention(d_model, n_heads, attn_dropout), d_model, scheme, n, dropout,
                                   admin_omega)
        self.ffn = Sublayer(FeedForward(d_model, d_ff, act_dropout, activation), d_model, scheme, n, dropout,
                            admin_omega)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
                cache: dict | None = None) -> torch.Tensor:
        """y: (B, T, D); memory: (B, S, D) final encoder output; cache: per-layer dict for incremental decoding."""
        y = self.self_attn(y, None, True, cache=None if cache is None else cache.setdefault("self", {}))
        y = self.cross_attn(y, memory, memory_mask, cache=None if cache is None else cache.setdefault("cross", {}))
        return self.ffn(y)


def _layer_kwargs(cfg: ModelConfig, n_sublayers: int) -> dict:
    return dict(d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff, dropout=cfg.dropout,
                attn_dropout=cfg.attn_dropout, act_dropout=cfg.act_dropout, activation=cfg.activation,
                residual=cfg.residual, n_sublayers=n_sublayers, admin_omega=cfg.admin_omega)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        scheme = get_scheme(cfg.residual)
        self.embed = PositionalEmbedding(embed_tokens, cfg.max_positions, cfg.dropout)
        kw = _layer_kwargs(cfg, 2 * cfg.n_enc_layers)
        self.layers = nn.ModuleList(EncoderLayer(**kw) for _ in range(cfg.n_enc_layers))
        self.final_norm = scheme.norm(scheme.final_norm, cfg.d_model)

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(src)
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_norm(x)


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


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed_tokens: nn.Embedding):
        super().__init__()
        scheme = get_scheme(cfg.residual)
        self.embed = PositionalEmbedding(embed_tokens, cfg.max_positions, cfg.dropout)
        kw = _layer_kwargs(cfg, 3 * cfg.n_dec_layers)
        self.layers = nn.ModuleList(DecoderLayer(**kw) for _ in range(cfg.n_dec_layers))
        self.final_norm = scheme.norm(scheme.final_norm, cfg.d_model)

    def forward(self, tgt_in: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None,
                cache: DecoderCache | None = None) -> torch.Tensor:
        offset = 0 if cache is None else cache.offset()
        y = self.embed(tgt_in, offset)
        for i, layer in enumerate(self.layers):
            y = layer(y, memory, memory_mask, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.length += tgt_in.shape[1]
        return self.final_norm(y)


class Seq2SeqTransformer(nn.Module):
    """The encoder-decoder. ``model(src, tgt_in)`` -> logits (B, T, tgt_vocab_size).

    The output projection is tied to the target embedding; with ``share_embeddings`` the source embedding is the
    same matrix too. Tokens equal to ``pad_id`` in ``src`` are masked as keys; the decoder's self-attention is causal
    (targets are right-padded, so a real token never sees a pad).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.src_vocab_size is None or cfg.tgt_vocab_size is None:
            raise ValueError("model.src_vocab_size / model.tgt_vocab_size: unset; give both (the trainer fills "
                             "them from the tokenizer)")
        self.cfg = cfg
        tgt_embed = nn.Embedding(cfg.tgt_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        src_embed = tgt_embed if cfg.share_embeddings else nn.Embedding(cfg.src_vocab_size, cfg.d_model,
                                                                        padding_idx=cfg.pad_id)
        self.encoder = Encoder(cfg, src_embed)
        self.decoder = Decoder(cfg, tgt_embed)
        init_weights(self)

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
        return F.linear(y, self.decoder.embed.embed_tokens.weight)

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
    """The reference initialisation (fairseq as used by Transformer-Clinic), kept apart from ``__init__``.

    Linears xavier-uniform with zero bias; each d x d block of the q/k/v projections xavier-uniform with gain
    1/sqrt(2) (as fairseq's fused in_proj); embeddings N(0, d^-1/2) with a zero pad row; LayerNorm gain 1, bias 0;
    Admin's omega back to its scheme's initial value.
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
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, OmegaResidual):
            m.reset_parameters()
    for m in model.modules():
        if isinstance(m, _Attention):
            for lin in m.in_projections():
                d_in = lin.weight.shape[1]
                for block in lin.weight.split(d_in, dim=0):
                    nn.init.xavier_uniform_(block, gain=1 / math.sqrt(2))
