"""Token positions, the one place they are decided (``model.positions``).

- ``sinusoidal`` (fairseq, Vaswani et al. 2017): a fixed table added to the scaled token embeddings;
- ``learned`` (GPT-2): a trained table of ``max_positions`` rows added the same way;
- ``rope`` (Su et al. 2021, arXiv 2104.09864; LLaMA): nothing added, queries and keys of self-attention are rotated.

RoPE in LLaMA's (Hugging Face's) layout: a head's dimensions are split in halves, pair (i, i + d/2) rotated by the
angle p * theta^(-2i/d) at position p::

    rope(x)_p = x_p * cos(p w) + rotate_half(x_p) * sin(p w),   rotate_half([x1, x2]) = [-x2, x1]

The angles are computed in float64 and cast to the activations' dtype, so a float64 model is exact.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .dropout import Dropout

POSITIONS = ("sinusoidal", "learned", "rope")


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
    """x_0 = Dropout(s * E[tokens] + P[positions]), s = sqrt(d) if ``scale`` (fairseq) else 1 (GPT-2, LLaMA).

    P is the sinusoidal buffer ``positions``, the learned table ``learned`` (an ``nn.Embedding``), or absent for
    ``rope``. The token table is ``self.embed_tokens``.
    """

    def __init__(self, embed_tokens: nn.Embedding, max_positions: int, dropout: float = 0.0,
                 kind: str = "sinusoidal", scale: bool = True):
        super().__init__()
        if kind not in POSITIONS:
            raise ValueError(f"positions: got {kind!r}, allowed: {', '.join(map(repr, POSITIONS))}")
        d_model = embed_tokens.embedding_dim
        self.embed_tokens, self.kind = embed_tokens, kind
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.max_positions = max_positions
        if kind == "sinusoidal":
            self.register_buffer("positions", sinusoidal_table(max_positions, d_model), persistent=False)
        elif kind == "learned":
            self.learned = nn.Embedding(max_positions, d_model)
        self.dropout = Dropout(dropout)

    def table(self) -> torch.Tensor | None:
        """The added position table (max_positions, d), or None for rotary positions."""
        return {"sinusoidal": lambda: self.positions, "learned": lambda: self.learned.weight,
                "rope": lambda: None}[self.kind]()

    def forward(self, tokens: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """``offset``: position of the first token, or a (T,) tensor of positions (no host sync: CUDA graphs)."""
        T = tokens.shape[1]
        x = self.embed_tokens(tokens)
        if self.scale != 1.0:
            x = x * self.scale
        if not isinstance(offset, torch.Tensor) and offset + T > self.max_positions:
            raise ValueError(f"sequence of {offset + T} tokens is longer than model.max_positions="
                             f"{self.max_positions}; raise max_positions or use shorter inputs")
        table = self.table()
        if table is not None:
            x = x + (table.index_select(0, offset) if isinstance(offset, torch.Tensor) else table[offset:offset + T])
        return self.dropout(x)


class Rotary(nn.Module):
    """RoPE's (cos, sin) tables for a head width ``d_head`` and base ``theta``; ``apply_rotary`` rotates q and k."""

    def __init__(self, d_head: int, theta: float = 10000.0):
        super().__init__()
        if d_head % 2:
            raise ValueError(f"rotary positions need an even head width, got {d_head}")
        self.d_head, self.theta = d_head, float(theta)
        # (dtype, device) -> (cos, sin) of positions 0..n-1, for ``span``. Not a buffer: a model.to(dtype) would
        # round a buffer, and a float64 model must get tables computed in float64 as ``forward`` computes them.
        self._tables: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) int -> cos, sin: (T, d_head) in ``dtype``."""
        exponents = torch.arange(0, self.d_head, 2, dtype=torch.float64, device=positions.device) / self.d_head
        angles = positions.to(torch.float64)[:, None] * self.theta ** -exponents[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def span(self, offset: int, length: int, dtype: torch.dtype,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of positions offset..offset+length-1, as row slices of tables kept per dtype and device.

        Why: the tables were recomputed (in float64, a dozen small kernels) at every forward, which is every token
        in generation. Each row is the same elementwise computation whatever the table's length, so a slice is
        bit-identical to ``forward``. A table grows (doubling) when a longer span is asked for. Under
        ``torch.compile`` the tables are computed in the graph as before.
        """
        end = offset + length
        if torch.compiler.is_compiling():
            return self.forward(torch.arange(offset, end, device=device), dtype)
        key = (dtype, torch.device(device))
        tables = self._tables.get(key)
        if tables is None or tables[0].shape[0] < end:
            n = max(end, 2 * tables[0].shape[0] if tables is not None else 256)
            with torch.inference_mode(False), torch.no_grad():  # usable by autograd after inference mode
                tables = self.forward(torch.arange(n, device=device), dtype)
            self._tables[key] = tables
        cos, sin = tables
        return cos[offset:end], sin[offset:end]

    def extra_repr(self) -> str:
        return f"d_head={self.d_head}, theta={self.theta}"


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: (B, H, T, Dh) rotated by the (T, Dh) tables ``rope = (cos, sin)``."""
    cos, sin = (t.to(x.dtype) for t in rope)  # under autocast q and k may be narrower than the tables
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def positions_of(offset: int | torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    """The (T,) positions of ``length`` tokens starting at ``offset`` (or ``offset`` itself when a tensor)."""
    if isinstance(offset, torch.Tensor):
        return offset
    return torch.arange(offset, offset + length, device=device)
