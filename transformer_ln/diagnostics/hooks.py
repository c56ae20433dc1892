"""Hook bookkeeping: the model never knows it is observed, and no hook outlives the diagnostic that placed it.

Every diagnostic registers its hooks inside ``registered_hooks()``; the handles are removed in ``finally``, so an
exception in the middle of a forward pass (a bad batch, a user's Ctrl-C) leaves the model exactly as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..model.schemes import Sublayer
from ..model.sublayer import STACKS


class HookSet:
    """Collects ``RemovableHandle``s; ``remove()`` detaches all of them (idempotent)."""

    def __init__(self) -> None:
        self.handles: list = []

    def forward(self, module: nn.Module, fn) -> None:
        self.handles.append(module.register_forward_hook(fn))

    def forward_pre(self, module: nn.Module, fn) -> None:
        self.handles.append(module.register_forward_pre_hook(fn))

    def remove(self) -> None:
        while self.handles:
            self.handles.pop().remove()


@contextmanager
def registered_hooks() -> Iterator[HookSet]:
    """``with registered_hooks() as hooks: hooks.forward(module, fn); ...``: removed on exit, error or not."""
    hooks = HookSet()
    try:
        yield hooks
    finally:
        hooks.remove()


@contextmanager
def mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Put ``model`` in train/eval mode for the block and restore every submodule's own flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def sublayers(model: nn.Module) -> dict[str, list[tuple[str, Sublayer]]]:
    """``{"encoder": [(name, Sublayer), ...], "decoder": [...]}`` in forward (= registration) order.

    Names are module paths such as ``encoder.layers.3.ffn``; the paper's index i is the 1-based position in its list.
    """
    out: dict[str, list[tuple[str, Sublayer]]] = {s: [] for s in STACKS}
    for name, module in model.named_modules():
        if isinstance(module, Sublayer):
            stack = name.split(".")[0]
            if stack not in out:
                raise ValueError(f"sub-layer {name!r} is outside encoder/decoder; pass the unwrapped "
                                 "Seq2SeqTransformer (accelerator.unwrap_model(model))")
            out[stack].append((name, module))
    if not out["encoder"] and not out["decoder"]:
        raise ValueError("no transformer_ln Sublayer found in the model")
    return out


def pad_masks(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool (B, T) masks, True at real tokens, for each stack's positions."""
    pad_id = model.cfg.pad_id
    return {"encoder": src.ne(pad_id), "decoder": tgt_in.ne(pad_id)}
