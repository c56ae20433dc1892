"""Per-sub-layer gradient norms (Liu et al. 2020, Sec. 3, "relative gradient norm"; TC ``--plot_gradient``).

For each sub-layer i (names such as ``encoder.layers.3.ffn``) we report

    output_grad_norm = |dL/dx_i|_F      at the sub-layer output x_i (LN output for Post-LN/Admin, the stream for Pre-LN;
                                        both streams of ResiDual, sqrt(|dL/dp_i|^2 + |dL/dd_i|^2))
    param_grad_norm  = sqrt(sum_p |dL/dp|_F^2)  over the sub-layer's own parameters (branch, norms, omega)

and each divided by its largest value in the whole network (``*_rel``), the paper's relative gradient norm. L is the
mean token cross-entropy over non-pad targets (a decoder-only model: next-token, logits[:, :-1] against ids[:, 1:],
unless targets are given). The gradients come from ``torch.autograd.grad`` on the sub-layer
outputs captured by forward hooks, so the model's ``.grad`` fields are never touched.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model.sublayer import stream_tensors
from .batch import batch_inputs
from .hooks import registered_hooks, sublayers
from .hooks import mode as train_mode
from .output_change import token_loss

NORM_KEYS = ("output_grad_norm", "param_grad_norm")


def gradient_norms(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor | None = None,
                   tgt_out: torch.Tensor | None = None, training: bool = False) -> dict[str, dict[str, Any]]:
    """``{name: {"stack", "index", "output_grad_norm", "param_grad_norm", "output_grad_rel", "param_grad_rel"}}``.

    Entries follow forward order (encoder then decoder); ``index`` is the paper's 1-based i within the stack.

    Args:
        model: an unwrapped ``Seq2SeqTransformer`` or ``CausalLM``; its ``.grad`` fields and train/eval flags are
            left as they were.
        src, tgt_in, tgt_out: int64 (B, S), (B, T), (B, T); pads in ``tgt_out`` are ignored by the loss, which
            defaults to next-token targets (``tgt_in`` shifted left). ``tgt_in=None``: ``src`` is the ids of a
            decoder-only model, called as ``model(ids)``; ``tgt_out`` then defaults to ids[:, 1:] for
            logits[:, :-1] (or give the batch's ``target``, aligned with the logits).
        training: measure with dropout on (the reference measured during its first training step); default off,
            so the numbers are deterministic.
    """
    stacks = sublayers(model)
    named = [(stack, i + 1, name, sub) for stack, subs in stacks.items() for i, (name, sub) in enumerate(subs)]
    outputs: dict[str, list[torch.Tensor]] = {}

    def capture(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            outputs[name] = stream_tensors(output)
        return hook

    with registered_hooks() as hooks, train_mode(model, training), torch.enable_grad():
        for _, _, name, sub in named:
            hooks.forward(sub, capture(name))
        loss = token_loss(model, src, tgt_in, tgt_out)
        params = [[p for p in sub.parameters() if p.requires_grad] for *_, sub in named]
        flat = [p for group in params for p in group]
        streams = [t for _, _, n, _ in named for t in outputs[n]]
        grads = torch.autograd.grad(loss, streams + flat, allow_unused=True)
    out_grads, param_grads = list(grads[:len(streams)]), list(grads[len(streams):])
    result: dict[str, dict[str, Any]] = {}
    for (stack, index, name, _), group in zip(named, params):
        g_outs = [out_grads.pop(0) for _ in outputs[name]]
        g_params = [param_grads.pop(0) for _ in group]
        result[name] = {
            "stack": stack, "index": index,
            "output_grad_norm": math.sqrt(sum(g.double().pow(2).sum().item() for g in g_outs if g is not None)),
            "param_grad_norm": math.sqrt(sum(g.double().pow(2).sum().item() for g in g_params if g is not None)),
        }
    for key in NORM_KEYS:
        top = max((r[key] for r in result.values()), default=0.0)
        for r in result.values():
            r[key.replace("_norm", "_rel")] = r[key] / top if top > 0 else 0.0
    return result


class GradNormCallback:
    """Trainer callback: every ``every`` updates, log ``gradient_norms`` on the current batch.

    The trainer calls ``on_update_end(ctx)`` after each optimizer update; ``ctx`` has ``update``, ``model``
    (unwrapped), ``batch`` (on the model's device: ``src``/``tgt_in``/``tgt_out`` for translation, ``input``/
    ``target`` for a language model; ``batch_inputs`` reads either) and ``log`` (appends one dict as a JSON line to
    the run's metrics.jsonl). With ``path`` the record goes to that JSON-lines file instead.
    Record: ``{"kind": "grad_norms", "update": u, "sublayers": {name: {...}}}``.
    """

    def __init__(self, every: int, path: str | Path | None = None):
        if every < 1:
            raise ValueError(f"every: got {every}, must be >= 1")
        self.every = every
        self.path = None if path is None else Path(path)

    def on_update_end(self, ctx: Any) -> None:
        if ctx.update % self.every:
            return
        inputs, target = batch_inputs(ctx.batch)
        record = {"kind": "grad_norms", "update": int(ctx.update),
                  "sublayers": gradient_norms(ctx.model, *inputs, tgt_out=target)}
        if self.path is None:
            ctx.log(record)
        else:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
