"""Branch functions shared by every residual scheme: attention, feed-forward, embeddings with positions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .norms import apply_norm


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout`` (zero with probability p, scale the rest by 1/(1-p)), with a cheaper mask on the CPU.

    Why: on the CPU ``F.dropout`` draws its mask with ``bernoulli_``, about twice the cost of ``torch.rand`` (6 vs
    3.4 ns per element on one core), and dropout's masks were a tenth of a CPU training step. ``rand >= p`` is the
    same Bernoulli(1 - p) mask (up to float32's 2^-24 resolution of p), from the same seeded generator. On CUDA the
    fused ``F.dropout`` kernel is already the fast one.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    mask = torch.rand(x.shape, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))  # 0 or 1/(1-p), float32
    return x * mask.to(x.dtype)


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by ``dropout`` above (same state, same distribution, cheaper on the CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class _Attention(nn.Module):
    """Common part of self- and cross-attention: heads, SDPA, output projection."""

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model: got {d_model}, must be divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.attn_dropout = attn_dropout
        self.inner_norm = nn.Identity()  # a norm before out_proj (Sub-LN's inner_attn_ln)
        self.inner_width = d_model
        self.out_proj = nn.Linear(d_model, d_model)

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
    values of earlier steps are kept there and the new ones appended.
    """

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0):
        super().__init__(d_model, n_heads, attn_dropout)
        self.qkv_proj = nn.Linear(d_model, 3 * d_model)

    def in_projections(self) -> list[nn.Linear]:
        return [self.qkv_proj]

    def projection_blocks(self) -> dict[str, torch.Tensor]:
        q, k, v = self.qkv_proj.weight.split(self.d_model, dim=0)
        return {"q": q, "k": k, "v": v, "out": self.out_proj.weight}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                cache: dict | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).view(B, T, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)
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

    def __init__(self, d_model: int, n_heads: int, attn_dropout: float = 0.0):
        super().__init__(d_model, n_heads, attn_dropout)
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)

    def in_projections(self) -> list[nn.Linear]:
        return [self.q_proj, self.kv_proj]

    def projection_blocks(self) -> dict[str, torch.Tensor]:
        k, v = self.kv_proj.weight.split(self.d_model, dim=0)
        return {"q": self.q_proj.weight, "k": k, "v": v, "out": self.out_proj.weight}

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None,
                cache: dict | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.d_head).transpose(1, 2)
        if cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            S = memory.shape[1]
            k, v = self.kv_proj(memory).view(B, S, 2, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4).unbind(0)
            if cache is not None:
                cache["k"], cache["v"] = k, v
        return self._attend(q, k, v, mask, False, keep)


class FeedForward(nn.Module):
    """FFN(x) = fc2(inner_norm(act_dropout(act(fc1(x))))); ``inner_norm`` is Sub-LN's ffn_layernorm (else Identity)."""

    def __init__(self, d_model: int, d_ff: int, act_dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"activation: got {activation!r}, allowed: {', '.join(map(repr, acts))}")
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = acts[activation]()
        self.act_dropout = Dropout(act_dropout)
        self.inner_norm = nn.Identity()  # a norm over the d_ff hidden units before fc2 (Sub-LN's ffn_layernorm)
        self.inner_width = d_ff
        self.fc2 = nn.Linear(d_ff, d_model)

    def projection_blocks(self) -> dict[str, torch.Tensor]:
        return {"fc1": self.fc1.weight, "fc2": self.fc2.weight}

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(apply_norm(self.inner_norm, self.act_dropout(self.act(self.fc1(x))), keep))


def sinusoidal_table(n_positions: int, d_model: int) -> torch.Tensor:
    """fairseq's sinusoidal positions: sin in the first half of the dimensions, cos in the second."""
    half = d_model // 2
    step = math.log(10000.0) / max(half - 1, 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)
    angles = torch.arange(n_positions, dtype=torch.float32)[:, None] * freqs[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if d_model % 2:
        table = torch.cat([table, torch.zeros(n_positions, 1)], dim=1)
    return table


class PositionalEmbedding(nn.Module):
    """x_0 = Dropout(sqrt(d) * E[tokens] + P[positions]); the token table is ``self.embed_tokens``."""

    def __init__(self, embed_tokens: nn.Embedding, max_positions: int, dropout: float = 0.0):
        super().__init__()
        d_model = embed_tokens.embedding_dim
        self.embed_tokens = embed_tokens
        self.scale = math.sqrt(d_model)
        self.max_positions = max_positions
        self.register_buffer("positions", sinusoidal_table(max_positions, d_model), persistent=False)
        self.dropout = Dropout(dropout)

    def forward(self, tokens: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """``offset``: position of the first token, or a (T,) tensor of positions (no host sync: CUDA graphs)."""
        T = tokens.shape[1]
        if isinstance(offset, torch.Tensor):
            pos = self.positions.index_select(0, offset)
        else:
            if offset + T > self.max_positions:
                raise ValueError(f"sequence of {offset + T} tokens is longer than model.max_positions="
                                 f"{self.max_positions}; raise max_positions or filter long sentences")
            pos = self.positions[offset:offset + T]
        return self.dropout(self.embed_tokens(tokens) * self.scale + pos)
