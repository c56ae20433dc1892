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


def stack_of(name: str, module: Sublayer) -> str:
    """The stack a sub-layer belongs to: its ``site.stack`` when it has a site, else its path's first component."""
    site = getattr(module, "site", None)
    stack = site.stack if site is not None else name.split(".")[0]
    if stack not in STACKS:
        raise ValueError(f"sub-layer {name!r} is outside encoder/decoder; pass the unwrapped model "
                         "(accelerator.unwrap_model(model))")
    return stack


def sublayers(model: nn.Module) -> dict[str, list[tuple[str, Sublayer]]]:
    """``{"encoder": [(name, Sublayer), ...], "decoder": [...]}`` in forward (= registration) order, holding only the
    stacks the model has (``{"decoder": ...}`` for a decoder-only ``CausalLM``), in ``STACKS`` order.

    Names are module paths such as ``encoder.layers.3.ffn`` or ``layers.3.ffn``; the paper's index i is the
    1-based position in its list. A sub-layer's stack is its ``site.stack`` (its path's first component if it has
    no site).
    """
    out: dict[str, list[tuple[str, Sublayer]]] = {s: [] for s in STACKS}
    for name, module in model.named_modules():
        if isinstance(module, Sublayer):
            out[stack_of(name, module)].append((name, module))
    if not any(out.values()):
        raise ValueError("no transformer_ln Sublayer found in the model")
    return {s: subs for s, subs in out.items() if subs}


def model_inputs(src: torch.Tensor, tgt_in: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """What the model is called with: ``(src, tgt_in)`` for the encoder-decoder, ``(ids,)`` when one is given."""
    return (src,) if tgt_in is None else (src, tgt_in)


def pad_masks(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Bool (B, T) masks, True at real tokens, for each stack's positions.

    Two inputs (src, tgt_in) feed the encoder and the decoder and are padded with ``model.cfg.pad_id``. One input
    (the ids of a decoder-only model) is a packed block: every position is real, in every stack the model has.
    """
    if tgt_in is None:
        every = torch.ones_like(src, dtype=torch.bool)
        return {stack: every for stack in sublayers(model)}
    pad_id = model.cfg.pad_id
    return {"encoder": src.ne(pad_id), "decoder": tgt_in.ne(pad_id)}
