"""Branch functions shared by every residual scheme: attention and feed-forward (positions: ``positions``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout, dropout  # noqa: F401 (importable from here as before)
from .norms import apply_norm
from .positions import PositionalEmbedding, apply_rotary, sinusoidal_table  # noqa: F401 (as before)


class _Attention(nn.Module):
    """Common part of self- and cross-attention: heads, SDPA, output projection."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model: got {d_model}, must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.attn_dropout = attn_dropout
        self.inner_norm = nn.Identity()  # a norm before out_proj (Sub-LN's inner_attn_ln)
        self.inner_width = d_model
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        # per-head norms over d_head on q, k (QK-norm) and v (HybridNorm's QKV-norm), before rotary positions
        self.q_norm, self.k_norm, self.v_norm = nn.Identity(), nn.Identity(), nn.Identity()

    def add_head_norms(self, make_norm, which: tuple[str, ...] = ("q", "k")) -> None:
        """Put ``make_norm(d_head)`` on the heads of ``which`` (of q, k, v): one gain shared by all heads (Qwen3's
        and ViT-22B's per-head QK-norm, HybridNorm's QKV-norm). A slot already filled is kept."""
        for name in which:
            if isinstance(getattr(self, f"{name}_norm"), nn.Identity):
                setattr(self, f"{name}_norm", make_norm(self.d_head))

    def _norm_heads(self, t: torch.Tensor, norm: nn.Module, keep: torch.Tensor | None) -> torch.Tensor:
        """``norm`` over the last dim of (B, H, T, Dh); BatchNorm's statistics over the real tokens of every head."""
        if isinstance(norm, nn.Identity):
            return t
        return apply_norm(norm, t, None if keep is None else keep[:, None, :].expand(t.shape[:3]))

    def in_projections(self) -> list[nn.Linear]:
        """Linears whose d x d blocks are the q, k, v maps (initialised with gain 1/sqrt(2), as fairseq)."""
        raise NotImplementedError

    def projection_blocks(self) -> dict[str, torch.Tensor]:
        """The d x d weight blocks ``q``, ``k``, ``v`` (views into the packed projections) and ``out``."""
        raise NotImplementedError

    def _attend(self, q, k, v, mask, is_causal: bool, keep: torch.Tensor | None = None) -> torch.Tensor:
        # q: (B, H, T, Dh), k/v: (B, H, S, Dh), mask: bool broadcastable to (B, H, T, S), True = attend
        p = self.attn_dropout if self.training else 0.0
        if p > 0.0 and q.device.type == "cpu":
            out = _attention_with_dropout_cpu(q, k, v, mask, is_causal, p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal)
        B, H, T, Dh = out.shape
        return self.out_proj(apply_norm(self.inner_norm, out.transpose(1, 2).reshape(B, T, H * Dh), keep))


def _attention_with_dropout_cpu(q, k, v, mask, is_causal: bool, p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) with dropout, then times v: what SDPA computes, in fewer passes.

    Why: with dropout the CPU SDPA falls back to its math path, which scales q and k separately, converts the
    boolean mask, runs a NaN-safe softmax (three extra passes) and draws a ``bernoulli_`` mask. Masked scores get the
    dtype's lowest value rather than -inf: exp underflows to exactly 0 either way, and a row with no allowed key
    (never produced by the model) averages the values instead of giving NaN or zeros.
    """
    scores = torch.matmul(q, k.transpose(-2, -1))
    if is_causal:
        T, S = scores.shape[-2:]
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        mask = allowed if mask is None else mask & allowed
    scale = q.shape[-1] ** -0.5
    if mask is None:
        scores = scores.mul_(scale)
    else:
        bias = torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(
            ~mask, torch.finfo(scores.dtype).min)
        scores = torch.add(bias, scores, alpha=scale)
    return torch.matmul(dropout(torch.softmax(scores, dim=-1), p, True), v)


class SelfAttention(_Attention):
    """Multi-head self-attention with one packed QKV projection.

    ``mask`` is a boolean key mask broadcastable to (B, H, T, S) with True where attention is allowed (the encoder's
    padding mask). ``causal=True`` hides future positions. ``cache`` (a dict) makes decoding incremental: keys and
    values of earlier steps are kept there and the new ones appended. ``rope`` = (cos, sin) tables of the new
    tokens' positions rotates q and k (``transformer_ln.model.positions``); the cache keeps rotated keys.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, n_heads, attn_dropout, bias)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)

    def in_projections(self) -> list[nn.Linear]:
        return [self.qkv_proj]

    def projection_blocks(self) -> dict[str, torch.Tensor]:
        q, k, v = self.qkv_proj.weight.split(self.d_model, dim=0)
        return {"q": q, "k": k, "v": v, "out": self.out_proj.weight}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: dict | None = None, keep: torch.Tensor | None = None, rope=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = (self._norm_heads(q, self.q_norm, keep), self._norm_heads(k, self.k_norm, keep),
                   self._norm_heads(v, self.v_norm, keep))
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if cache is not None and "slots" in cache:  # static cache: write at the positions, attend to those before
            pos = cache["pos"]  # (T,) positions of the new tokens
            cache["k"].index_copy_(2, pos, k.to(cache["k"].dtype))  # autocast may hand bf16 to a float cache
            cache["v"].index_copy_(2, pos, v.to(cache["v"].dtype))
            allowed = cache["slots"][None, :] <= pos[:, None]  # (T, max_len)
            mask = allowed if mask is None else mask & allowed
            return self._attend(q, cache["k"], cache["v"], mask, False, keep)
        past = 0
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k = torch.cat([cache["k"], k], dim=2)  # (B, H, past + T, Dh)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        is_causal = causal and past == 0 and T > 1
        if causal and past > 0 and T > 1:  # several new tokens after a cached prefix
            allowed = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
            mask = allowed if mask is None else mask & allowed
        return self._attend(q, k, v, mask, is_causal, keep)


class CrossAttention(_Attention):
    """Attention from the decoder stream (queries) to the final encoder output (keys and values).

    With a ``cache`` dict the projected encoder keys and values are computed once and reused at every step.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, n_heads, attn_dropout, bias)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=bias)

    def in_projections(self) -> list[nn.Linear]:
        return [self.q_proj, self.kv_proj]

    def projection_blocks(self) -> dict[str, torch.Tensor]:
        k, v = self.kv_proj.weight.split(self.d_model, dim=0)
        return {"q": self.q_proj.weight, "k": k, "v": v, "out": self.out_proj.weight}

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None,
                cache: dict | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self._norm_heads(self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2), self.q_norm, keep)
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            S = memory.shape[1]
            k, v = self.kv_proj(memory).view(B, S, 2, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)
            # the memory's padding is not known here: BatchNorm (the one norm that needs it) counts every position
            k, v = self._norm_heads(k, self.k_norm, None), self._norm_heads(v, self.v_norm, None)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        return self._attend(q, k, v, mask, False, keep)


class SwiGLU(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv 2002.05202; LLaMA): [a, b] -> silu(a) * b, halving the width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b


# activation -> (module, width factor of fc1's output): a gated unit reads two d_ff-wide halves
ACTIVATIONS = {"relu": (nn.ReLU, 1), "gelu": (nn.GELU, 1), "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), 1),
               "swiglu": (SwiGLU, 2)}


class FeedForward(nn.Module):
    """FFN(x) = fc2(inner_norm(act_dropout(act(fc1(x))))); ``inner_norm`` is Sub-LN's ffn_layernorm (else Identity).

    ``activation``: relu, gelu, gelu_tanh (GPT-2's "gelu_new") or swiglu, whose fc1 packs LLaMA's gate and up
    projections as [gate; up] (2 d_ff outputs): fc2(silu(gate x) * up x).
    """

    def __init__(self, d_model: int, d_ff: int, act_dropout: float = 0.0, activation: str = "relu",
                 bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: got {activation!r}, allowed: {', '.join(map(repr, ACTIVATIONS))}")
        make_act, width = ACTIVATIONS[activation]
        self.fc1 = nn.Linear(d_model, width * d_ff, bias=bias)
        self.act = make_act()
        self.act_dropout = Dropout(act_dropout)
        self.inner_norm = nn.Identity()  # a norm over the d_ff hidden units before fc2 (Sub-LN's ffn_layernorm)
        self.inner_width = d_ff
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def projection_blocks(self) -> dict[str, torch.Tensor]:
        return {"fc1": self.fc1.weight, "fc2": self.fc2.weight}

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(apply_norm(self.inner_norm, self.act_dropout(self.act(self.fc1(x))), keep))
