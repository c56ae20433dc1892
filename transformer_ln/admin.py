"""Admin for other people's code, and the paper's profiling initialisation for ours.

Drop-in for admin-torch users::

    residual = transformer_ln.admin.as_module(num_res_layers=2 * n_layers, as_parameter=True, embed_dim=d)
    x = layer_norm(residual(x, dropout(f(x))))      # = LN(x * omega + f(x))

``admin_init`` is Admin's profiling (Liu et al. 2020, Sec. 4; Transformer-Clinic's ``adaptive-profiling``): one
forward pass in sub-layer order, each stack with its own running value r that starts at 1::

    omega_i <- r
    r       <- sqrt(Var[omega_i * x_{i-1}] + Var[a_i])

so omega_i^2 ~ Var[x_0] + sum_{j<i} Var[a_j]. Variances are scalars over all hidden units of the non-pad positions
(the reference code also counted padding). The forward runs in train mode, as the reference does, so dropout noise
enters Var[a_i]; the RNG is seeded and restored, so the result is deterministic given the batch and ``seed``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .residual import OmegaResidual, calculate_init

__all__ = ["calculate_init", "as_module", "OmegaResidual", "admin_init", "omega_stats", "omega_summary"]


def as_module(num_res_layers: int, output_change_scale: str = "O(logn)", as_parameter: bool = False,
              embed_dim: int | None = None) -> OmegaResidual:
    """A module whose ``forward(x, f_x)`` is ``x * omega + f_x`` with omega = ``calculate_init(...)``.

    Args:
        num_res_layers: residual sub-layers in the stack (2 per encoder layer, 3 per decoder layer).
        output_change_scale: "O(logn)" (default), "O(n)" (vanilla Post-LN) or "O(1)".
        as_parameter: a trainable vector of size ``embed_dim`` instead of a frozen scalar buffer.
    """
    return OmegaResidual(calculate_init(num_res_layers, output_change_scale), as_parameter, embed_dim)


def _stack_of(name: str) -> str:
    parts = name.split(".")
    for stack in ("encoder", "decoder"):
        if stack in parts:
            return stack
    raise ValueError(f"cannot tell which stack {name!r} belongs to; pass the unwrapped Seq2SeqTransformer")


@torch.no_grad()
def admin_init(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor, seed: int = 0,
               train_mode: bool = True) -> dict[str, list[float]]:
    """Profile omega for every Admin sub-layer on one batch and write it into the model.

    Args:
        model: an (unwrapped) ``Seq2SeqTransformer`` with ``residual='admin'``.
        src, tgt_in: one batch, int64 (B, S) and (B, T); the same batch on every process gives the same omega.
        seed: seeds the dropout masks of the profiling pass (the caller's RNG state is restored).
        train_mode: profile with dropout on (the reference) or off.
    Returns:
        ``{"encoder": [omega_1, ...], "decoder": [...]}``. No parameter other than omega changes.
    """
    residuals = [(n, m) for n, m in model.named_modules() if isinstance(m, OmegaResidual)]
    if not residuals:
        raise ValueError("admin_init needs a model built with model.residual='admin'")
    pad_id = model.cfg.pad_id
    keep = {"encoder": src.ne(pad_id), "decoder": tgt_in.ne(pad_id)}
    running = {"encoder": 1.0, "decoder": 1.0}
    profile: dict[str, list[float]] = {"encoder": [], "decoder": []}

    def make_hook(stack: str):
        def hook(module: OmegaResidual, inputs):
            x, a = inputs
            module.omega.fill_(running[stack])
            profile[stack].append(running[stack])
            m = keep[stack]
            var = (x * module.omega)[m].double().var(unbiased=False) + a[m].double().var(unbiased=False)
            running[stack] = math.sqrt(var.item())
        return hook

    was_training = model.training
    handles = [m.register_forward_pre_hook(make_hook(_stack_of(n))) for n, m in residuals]
    devices = [src.device] if src.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.train(train_mode)
            model(src, tgt_in)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return profile


def omega_summary(model: nn.Module) -> torch.Tensor | None:
    """[min, mean, max] of all omega entries as one device tensor (no host sync), or None without Admin."""
    omegas = [m.omega.detach().float().reshape(-1) for m in model.modules() if isinstance(m, OmegaResidual)]
    if not omegas:
        return None
    flat = torch.cat(omegas)
    return torch.stack([flat.min(), flat.mean(), flat.max()])


def omega_stats(model: nn.Module) -> dict[str, float] | None:
    """min/mean/max of all omega entries (for logs), or None for a model without Admin residuals."""
    summary = omega_summary(model)
    if summary is None:
        return None
    lo, mean, hi = summary.tolist()
    return {"omega_min": lo, "omega_mean": mean, "omega_max": hi}
