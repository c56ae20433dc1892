"""Depth-scaled residual branches (depth-muP, CompleteP) and their optimizer rule: an option of every scheme.

    x_i = x_{i-1} + m_L^(-a) * B_i(...)        m_L = L / L_base         (CompleteP's Table 1, arXiv 2505.01618)

L is the number of layers of the sub-layer's stack (``model.branch_base_depth`` = L_base, 1 by default, so the
multiplier is 1/sqrt(L) or 1/L). ``model.branch_scale``:

    depth_mup  a = 1/2  (Yang et al. 2023, arXiv 2310.02244; Bordelon et al. 2023, arXiv 2309.16620): branch
               1/sqrt(L), and for Adam the hidden learning rate x m_L^(-1/2)
    completep  a = 1    (Dey et al. 2025, "CompleteP"): branch 1/L, learning rate unchanged

The rule for Adam (CompleteP Table 1 with the width multiplier m_N = 1, since we do not scale width): every parameter
inside a residual sub-layer (hidden weights, biases, Pre-LN gains) gets learning rate x m_L^(a - 1) and AdamW epsilon
x m_L^(-a); embeddings, unembedding and the final norm are unchanged. CompleteP's code scales epsilon for every
group; we follow the table. Init variances do not change with depth (the toolkit's default init has no
1/sqrt(2L) term to drop). In a Post-LN scheme the multiplier scales the branch inside the norm: LN(x + m a).
"""
from __future__ import annotations

from torch import nn

BRANCH_SCALES: dict[str, float] = {"none": 0.0, "depth_mup": 0.5, "completep": 1.0}  # name -> exponent a


def _exponent(kind: str) -> float:
    try:
        return BRANCH_SCALES[kind]
    except KeyError:
        raise ValueError(f"branch_scale: got {kind!r}, allowed: {', '.join(map(repr, BRANCH_SCALES))}") from None


def branch_multiplier(kind: str, n_layers: int, base_depth: int = 1) -> float:
    """m_L^(-a): what the branch of a sub-layer in a stack of ``n_layers`` layers is multiplied by."""
    a = _exponent(kind)
    return 1.0 if a == 0.0 else (n_layers / base_depth) ** -a


def optimizer_scales(kind: str, n_layers: int, base_depth: int = 1) -> tuple[float, float]:
    """(learning-rate factor m_L^(a-1), AdamW epsilon factor m_L^(-a)) of the parameters inside a sub-layer."""
    a = _exponent(kind)
    if a == 0.0:
        return 1.0, 1.0
    m = n_layers / base_depth
    return m ** (a - 1.0), m ** -a


def param_groups(model: nn.Module, eps: float) -> list[dict]:
    """The optimizer's parameter groups: one per (lr factor, eps factor) that the model's sub-layers ask for
    (``ResidualScheme.optimizer_scales``), the rest (embeddings, final norms, output) in a group of factor 1.

    Each group carries ``lr_scale``, which the schedule multiplies its learning rate by. A model whose sub-layers
    all ask for (1, 1) gets one group, as before the option existed (so old runs' optimizer states still load).
    """
    scales: dict[int, tuple[float, float]] = {}
    for m in model.modules():  # the sub-layers: they know their scheme and site (no import of sublayer: no cycle)
        scheme, site = getattr(m, "scheme", None), getattr(m, "site", None)
        if site is not None and hasattr(scheme, "optimizer_scales"):
            s = scheme.optimizer_scales(site)
            for p in m.parameters():
                scales.setdefault(id(p), s)
    groups: dict[tuple[float, float], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(scales.get(id(p), (1.0, 1.0)), []).append(p)
    return [{"params": ps, "lr_scale": lr_f, "eps": eps * eps_f} for (lr_f, eps_f), ps in groups.items()]
