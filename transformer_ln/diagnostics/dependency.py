"""Residual-branch dependency beta_{i,j} (Liu et al. 2020, Sec. 3; Transformer-Clinic ``--plot_variance``).

Each sub-layer output is an exact linear sum of the stack input and the branch outputs,

    x_i = sum_{j=0..i} c_{i,j}(a_j) + (LayerNorm shifts),      a_0 = x_0 (the embedding output),

and beta_{i,j} = s_{i,j} / sqrt(sum_k s_{i,k}^2), with s_{i,j} the per-token std (over hidden units) of component j
in x_i, averaged over non-pad positions. Components are tracked as tensors through hooks:

* At a sub-layer's residual combiner s * x + b * a (``Residual.scales()``: Admin's omega, DeepNorm's alpha on the
  shortcut, ReZero's alpha on the branch) the old components are multiplied by s and the new one is b * a_i; a plain
  shortcut (Pre-LN, Sub-LN, Sandwich, T-Fixup) just appends a_i. Norms inside a branch are part of a_i.
* At a post-norm every component goes through the norm's linear part (``norm.decompose``): for LayerNorm
  gamma_i * (c - mean(c)) / sigma_i with sigma_i the per-token std of the norm input (with its eps); RMSNorm,
  DyT and BatchNorm have their own. Keeping 1/sigma matters: without it Post-LN and Pre-LN give the same beta at
  initialisation.
* ResiDual: the hooks see its Post-LN stream p (the combiner ``residual``); its accumulated stream d only enters the
  stack output.

Unlike the reference code we instrument the decoder too (x_0 = target embedding output; the cross-attention
branches are decoder components; the encoder output enters only through branches), mask padding, and run in eval
mode so dropout noise does not enter. A decoder-only model (``CausalLM``, called with its ids alone) has one stack,
"decoder", whose x_0 is the embedding output; its packed blocks have no padding, so every position counts.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .hooks import mode, model_inputs, pad_masks, registered_hooks, sublayers


def beta_from_stds(s: np.ndarray) -> np.ndarray:
    """beta_{i,j} = s_{i,j} / sqrt(sum_k s_{i,k}^2), row by row; rows of zeros stay zero."""
    norm = np.sqrt((s ** 2).sum(axis=1, keepdims=True))
    return np.divide(s, norm, out=np.zeros_like(s), where=norm > 0)


class _StackTracker:
    """Components of one stack's stream, updated by the hooks in forward order."""

    def __init__(self, n_sub: int, keep: torch.Tensor, keep_components: bool = False):
        self.comps: list[torch.Tensor] = []
        self.keep = keep  # (B, T) True at real tokens
        self.s = np.zeros((n_sub, n_sub + 1))
        self.row = 0
        self.rows: list[torch.Tensor] | None = [] if keep_components else None

    def on_residual(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x, a = inputs[0], inputs[1]
        if not self.comps:  # first sub-layer of the stack: its shortcut is x_0
            self.comps.append(x.double())
        s, b = module.scales()
        if s is not None:
            s = s.detach().double() if isinstance(s, torch.Tensor) else float(s)
            self.comps = [c * s for c in self.comps]
        a = a.double()
        if b is not None:
            a = a * (b.detach().double() if isinstance(b, torch.Tensor) else float(b))
        self.comps.append(a)

    def on_norm(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.comps = module.decompose(self.comps, inputs[0].double())

    def on_sublayer(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        for j, c in enumerate(self.comps):
            self.s[self.row, j] = c.std(dim=-1, unbiased=False)[self.keep].mean().item()
        if self.rows is not None:
            self.rows.append(torch.stack(self.comps))
        self.row += 1


@torch.no_grad()
def _track(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor | None,
           keep_components: bool = False) -> dict[str, _StackTracker]:
    """One eval-mode forward pass with the trackers' hooks on every sub-layer of every stack the model has."""
    stacks = sublayers(model)
    keep = pad_masks(model, src, tgt_in)
    trackers = {s: _StackTracker(len(subs), keep[s], keep_components) for s, subs in stacks.items()}
    with registered_hooks() as hooks, mode(model, False):
        for stack, subs in stacks.items():
            tr = trackers[stack]
            for name, sub in subs:
                if not hasattr(sub.residual, "scales"):
                    raise ValueError(f"{name}.residual is {type(sub.residual).__name__}; the dependency "
                                     "decomposition needs a transformer_ln Residual (with scales())")
                hooks.forward(sub.residual, tr.on_residual)
                if hasattr(sub.post_norm, "decompose"):
                    hooks.forward(sub.post_norm, tr.on_norm)
                elif not isinstance(sub.post_norm, nn.Identity):
                    raise ValueError(f"{name}.post_norm is {type(sub.post_norm).__name__}; the dependency "
                                     "decomposition needs a norm from transformer_ln.model.norms (with decompose())")
                hooks.forward(sub, tr.on_sublayer)
        model(*model_inputs(src, tgt_in))
    return trackers


def residual_stds(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """s_{i,j} per stack, shape (n_sub, n_sub + 1): row i-1 describes x_i, column j the component a_j (a_0 = x_0).

    ``tgt_in=None``: ``src`` is the ids of a decoder-only model, ``model(ids)``, every position real."""
    return {stack: tr.s for stack, tr in _track(model, src, tgt_in).items()}


def residual_components(model: nn.Module, src: torch.Tensor,
                        tgt_in: torch.Tensor | None = None) -> dict[str, list[torch.Tensor]]:
    """The tracked components themselves, for checks on small models: per stack a list over sub-layers, entry i-1
    a float64 tensor (i + 1, B, T, D) whose row j is the component of a_j (a_0 = x_0) in x_i.

    Their sum is the sub-layer output x_i less the norms' shifts (module docstring): exactly x_i for schemes
    without a post-norm (Pre-LN), x_i minus the propagated LayerNorm biases and means for Post-LN. ResiDual: its
    Post-LN stream p.
    """
    return {stack: tr.rows for stack, tr in _track(model, src, tgt_in, keep_components=True).items()}


def residual_dependency(model: nn.Module, src: torch.Tensor,
                        tgt_in: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """beta per stack: ``{"encoder": (2N, 2N+1), "decoder": (3M, 3M+1)}`` numpy arrays; for a decoder-only model
    ``{"decoder": (2M, 2M+1)}``.

    Row i-1 is x_i; column 0 is the stack input x_0, column j the branch a_j. Rows have unit L2 norm and entries
    right of the diagonal (j > i) are 0. The diagonal beta_{i,i} is the dependency of x_i on its own branch.

    Args:
        model: an unwrapped ``Seq2SeqTransformer`` or ``CausalLM``; its train/eval flags are restored afterwards.
        src, tgt_in: int64 (B, S) and (B, T); pad tokens are left out of the averages. With ``tgt_in=None`` the
            model is called with ``src`` alone (the ids of a decoder-only model) and every position is real.
    """
    return {stack: beta_from_stds(s) for stack, s in residual_stds(model, src, tgt_in).items()}
