"""Decoder-only language model (GPT-2 and LLaMA shapes) from the same sub-layers and schemes.

Layer l holds causal self-attention (sub-layer 2l+1) and FFN (2l+2), each a ``Sublayer`` of the chosen scheme. Its
``Site`` is the decoder stack's with no encoder (``n_enc_layers = 0``, ``n_sublayers = 2 M``), from which the
depth-dependent schemes take their decoder-only constants: DeepNorm alpha = (2M)^(1/4), beta = (8M)^(-1/4); Sub-LN
gamma = sqrt(ln 2M); Admin n = 2M; T-Fixup (no decoder-only form in the paper) the encoder's (see ``TFixup``).

    x_0 = Dropout(s E[ids] + P)      h = scheme.end(layers(scheme.begin(x_0)))      logits = h W_out^T

The components are config values, each decided in one place: ``model.positions`` (``positions``), ``activation``
and ``bias`` (``layers``), ``norm`` and ``norm_eps`` (``norms``), ``tie_embeddings`` (here: W_out = E, or a matrix
of its own ``lm_head``). The ``gpt2`` and ``llama`` presets of ``transformer_ln.config`` set them as those models do.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .layers import FeedForward, SelfAttention
from .schemes import ResidualScheme, scheme_from_config
from .seq2seq import DecoderCache, _Layer, _layer_kwargs, _rope, _scheme, _sites, _Stack, init_weights

if TYPE_CHECKING:
    from ..config.run_config import ModelConfig


class CausalLayer(_Layer):
    """Causal self-attention then FFN: an encoder layer with a causal mask, the block of GPT-2 and LLaMA.

    Arguments as ``EncoderLayer``; ``depths`` = (0, M) for a stack of M such layers (or ``n_sublayers`` = 2 M). A
    scheme with depth-dependent constants (DeepNorm, Sub-LN, T-Fixup, Admin's closed forms) needs one of them;
    the others count the layer alone.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attn_dropout: float = 0.0,
                 act_dropout: float = 0.0, activation: str = "relu", residual: str | ResidualScheme = "pre_ln",
                 n_sublayers: int | None = None, *, layer_index: int = 0, depths: tuple[int, int] | None = None,
                 init: bool = True, bias: bool = True, **scheme_options):
        super().__init__()
        scheme = _scheme(residual, scheme_options)
        s_attn, s_ffn = _sites("decoder", ("self_attn", "ffn"), layer_index, d_model, n_sublayers, depths, scheme,
                               causal=True)
        self.self_attn = scheme.build_sublayer(SelfAttention(d_model, n_heads, attn_dropout, bias), s_attn, dropout)
        self.ffn = scheme.build_sublayer(FeedForward(d_model, d_ff, act_dropout, activation, bias), s_ffn, dropout)
        self._finish(scheme, init)

    def forward(self, x: torch.Tensor, cache: dict | None = None, keep: torch.Tensor | None = None,
                rope=None) -> torch.Tensor:
        """x: (B, T, D); cache: this layer's dict for incremental decoding; rope: rotary tables of the positions."""
        kw = {} if keep is None else {"keep": keep}
        x = self.self_attn(x, None, True, cache=None if cache is None else cache.setdefault("self", {}), **kw,
                           **_rope(rope))
        return self.ffn(x, **kw)


class CausalLM(_Stack):
    """The decoder-only language model: ``model(ids)`` -> next-token logits (B, T, V).

    ``cfg`` is a ``ModelConfig`` with ``arch='decoder_only'``: depth ``n_dec_layers``, vocabulary ``tgt_vocab_size``.
    Sequences are packed blocks without padding, so no key mask and no pad row in the embedding (a converted GPT-2
    trains every token's row). With a ``DecoderCache`` only the new tokens are fed (generation).
    """

    _no_split_modules = ["CausalLayer"]  # FSDP units (accelerate's transformer-based wrap)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.tgt_vocab_size is None:
            raise ValueError("model.tgt_vocab_size: unset; the decoder-only model's vocabulary (the trainer fills it "
                             "from the tokenizer)")
        self.cfg = cfg
        self.scheme = scheme_from_config(cfg)
        self._embedding(cfg, nn.Embedding(cfg.tgt_vocab_size, cfg.d_model))
        kw = _layer_kwargs(cfg, self.scheme, depths=(0, cfg.n_dec_layers))
        self.layers = nn.ModuleList(CausalLayer(**kw, layer_index=i) for i in range(cfg.n_dec_layers))
        self.final_norm = self.scheme.stack_norm(cfg.d_model)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        self.batch_stats = any(layer.batch_stats for layer in self.layers)
        init_weights(self)

    def rope(self, offset: int | torch.Tensor, length: int, x: torch.Tensor):
        """(cos, sin) for ``length`` tokens from ``offset``, or None without rotary positions; slices of cached
        tables for an int offset (``Rotary.span``), computed from the positions for a tensor one."""
        if self.rotary is None or isinstance(offset, torch.Tensor):
            return super().rope(offset, length, x)
        return self.rotary.span(offset, length, x.dtype, x.device)

    def output_weight(self) -> torch.Tensor:
        """The (V, D) matrix that turns the last hidden states into logits."""
        return self.embed.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def hidden(self, ids: torch.Tensor, cache: DecoderCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, D) of ``ids`` (int64 (B, T)); with ``cache``, ``ids`` are the new tokens."""
        offset = 0 if cache is None else cache.offset()
        x0 = self.embed(ids, offset)
        rope = self.rope(offset, ids.shape[1], x0)
        keep = torch.ones_like(ids, dtype=torch.bool) if self.batch_stats and self.training else None
        x = self.scheme.begin(x0)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache.layers[i], keep, rope)
        if cache is not None:
            cache.length += ids.shape[1]
        return self.scheme.end(x, self.final_norm, keep)

    def forward(self, ids: torch.Tensor, cache: DecoderCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Next-token logits (B, T, V); ``last_only`` projects only the last position (B, 1, V), as generation
        needs."""
        h = self.hidden(ids, cache)
        if last_only:
            h = h[:, -1:]
        return F.linear(h, self.output_weight())

    def new_cache(self) -> DecoderCache:
        return DecoderCache(len(self.layers))


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg.arch`` asks for: ``Seq2SeqTransformer`` (encoder_decoder) or ``CausalLM`` (decoder_only)."""
    from .seq2seq import Seq2SeqTransformer

    arch = getattr(cfg, "arch", "encoder_decoder")
    if arch == "decoder_only":
        return CausalLM(cfg)
    if arch == "encoder_decoder":
        return Seq2SeqTransformer(cfg)
    raise ValueError(f"model.arch: got {arch!r}, allowed: 'encoder_decoder', 'decoder_only'")
