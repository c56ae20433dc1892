"""Residual-branch dependency beta_{i,j} (Liu et al. 2020, Sec. 3; Transformer-Clinic ``--plot_variance``).

Each sub-layer output is an exact linear sum of the stack input and the branch outputs,

    x_i = sum_{j=0..i} c_{i,j}(a_j) + (LayerNorm shifts),      a_0 = x_0 (the embedding output),

and beta_{i,j} = s_{i,j} / sqrt(sum_k s_{i,k}^2), with s_{i,j} the per-token std (over hidden units) of component j
in x_i, averaged over non-pad positions. Components are tracked as tensors through hooks:

* Pre-LN: the stream is the plain sum x_0 + a_1 + ... + a_i; components are the raw branch outputs.
* Post-LN / Admin: at an Admin shortcut the old components are multiplied by omega_i; at LN_i every component c
  becomes gamma_i * (c - mean(c)) / sigma_i, sigma_i the per-token std of the LN input (with the LN's eps). Keeping
  1/sigma matters: without it Post-LN and Pre-LN give the same beta at initialisation.

Unlike the reference code we instrument the decoder too (x_0 = target embedding output; the cross-attention
branches are decoder components; the encoder output enters only through branches), mask padding, and run in eval
mode so dropout noise does not enter.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..residual import OmegaResidual
from .hooks import STACKS, mode, pad_masks, registered_hooks, sublayers


def beta_from_stds(s: np.ndarray) -> np.ndarray:
    """beta_{i,j} = s_{i,j} / sqrt(sum_k s_{i,k}^2), row by row; rows of zeros stay zero."""
    norm = np.sqrt((s ** 2).sum(axis=1, keepdims=True))
    return np.divide(s, norm, out=np.zeros_like(s), where=norm > 0)


class _StackTracker:
    """Components of one stack's stream, updated by the hooks in forward order."""

    def __init__(self, n_sub: int, keep: torch.Tensor):
        self.comps: list[torch.Tensor] = []
        self.keep = keep  # (B, T) True at real tokens
        self.s = np.zeros((n_sub, n_sub + 1))
        self.row = 0

    def on_residual(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x, a = inputs[0], inputs[1]
        if not self.comps:  # first sub-layer of the stack: its shortcut is x_0
            self.comps.append(x.double())
        if isinstance(module, OmegaResidual):
            omega = module.omega.detach().double()
            self.comps = [c * omega for c in self.comps]
        self.comps.append(a.double())

    def on_norm(self, module: nn.LayerNorm, inputs: tuple, output: torch.Tensor) -> None:
        b = inputs[0].double()
        sigma = torch.sqrt(b.var(dim=-1, unbiased=False, keepdim=True) + module.eps)  # (B, T, 1)
        gain = module.weight.detach().double() if module.weight is not None else 1.0
        self.comps = [gain * (c - c.mean(dim=-1, keepdim=True)) / sigma for c in self.comps]

    def on_sublayer(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        for j, c in enumerate(self.comps):
            self.s[self.row, j] = c.std(dim=-1, unbiased=False)[self.keep].mean().item()
        self.row += 1


@torch.no_grad()
def residual_stds(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, np.ndarray]:
    """s_{i,j} per stack, shape (n_sub, n_sub + 1): row i-1 describes x_i, column j the component a_j (a_0 = x_0)."""
    stacks = sublayers(model)
    keep = pad_masks(model, src, tgt_in)
    trackers = {s: _StackTracker(len(stacks[s]), keep[s]) for s in STACKS}
    with registered_hooks() as hooks, mode(model, False):
        for stack in STACKS:
            tr = trackers[stack]
            for name, sub in stacks[stack]:
                hooks.forward(sub.residual, tr.on_residual)
                if isinstance(sub.post_norm, nn.LayerNorm):
                    hooks.forward(sub.post_norm, tr.on_norm)
                elif not isinstance(sub.post_norm, nn.Identity):
                    raise ValueError(f"{name}.post_norm is {type(sub.post_norm).__name__}; the dependency "
                                     "decomposition knows LayerNorm and Identity only")
                hooks.forward(sub, tr.on_sublayer)
        model(src, tgt_in)
    return {s: trackers[s].s for s in STACKS}


def residual_dependency(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, np.ndarray]:
    """beta per stack: ``{"encoder": (2N, 2N+1), "decoder": (3M, 3M+1)}`` numpy arrays.

    Row i-1 is x_i; column 0 is the stack input x_0, column j the branch a_j. Rows have unit L2 norm and entries
    right of the diagonal (j > i) are 0. The diagonal beta_{i,i} is the dependency of x_i on its own branch.

    Args:
        model: an unwrapped ``Seq2SeqTransformer``; its train/eval flags are restored afterwards.
        src, tgt_in: int64 (B, S) and (B, T); pad tokens are left out of the averages.
    """
    return {stack: beta_from_stds(s) for stack, s in residual_stds(model, src, tgt_in).items()}
