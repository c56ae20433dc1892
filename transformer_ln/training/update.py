"""One optimizer update, as functions: the loss, the accumulated gradient over processes, the probe of new weights.

The recipe follows fairseq and the Admin paper: label-smoothed cross-entropy summed over tokens and divided by the
global number of target tokens (across processes and accumulation steps), an inverse-sqrt schedule set from the
update count, Adam or RAdam. ``accumulate`` computes the gradient and the statistics the divergence guard needs;
the caller decides whether ``optimizer.step()`` follows. The loss of a batch is the task's (``task.Task.loss``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from ..config.run_config import RunConfig
from ..model.depth_scaling import param_groups
from .schedule import inverse_sqrt_lr


def resolve_mixed_precision(value: str, device: torch.device) -> str:
    if value != "auto":
        return value
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam with decoupled weight decay (AdamW), or RAdam.

    Our RAdam is ``torch.optim.RAdam(decoupled_weight_decay=True)``. The reference's RAdam (Transformer-Clinic)
    applies no update while the variance rectification term rho_t < 5, whereas torch's takes un-adapted
    momentum-SGD steps in those first few updates.
    """
    o = cfg.optim
    params = param_groups(model, o.eps)  # one group unless the branches are depth-scaled (their lr and eps rule)
    if o.name == "adam":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                 fused=device.type == "cuda" or None)
    return torch.optim.RAdam(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                             decoupled_weight_decay=True)


def set_lr(optimizer, update: int, cfg: RunConfig) -> float:
    """lr(t) of the inverse-sqrt schedule before update t + 1, on every parameter group."""
    o = cfg.optim
    lr = inverse_sqrt_lr(update, o.lr, o.warmup_updates, o.warmup_init_lr)
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr


def accumulate(acc, model, group: list[dict | None], cfg: RunConfig, task,
               telemetry: Callable[[], dict[str, torch.Tensor] | None] | None = None) -> dict[str, float]:
    """Forward and backward over ``update_freq`` micro-batches; returns the global loss, nll and grad norm (bits).

    Each micro-batch's summed loss is scaled by world / (global target tokens) so that, after DDP averages the
    gradients over processes, the gradient is that of sum(loss) / sum(tokens) over everything in the update.
    A ``None`` micro-batch (this process ran out of batches) repeats a real one with weight 0. ``telemetry``
    gives the scheme's own numbers (Admin's omega before the update: ``ResidualScheme.update_stats``) as device
    scalars; they join the update's one host sync and come back under their names.
    """
    real = [b for b in group if b is not None]
    local_tokens = sum(b["ntokens"] for b in real)
    counts = acc.reduce(torch.tensor([float(local_tokens)], device=acc.device), reduction="sum")
    scale = acc.num_processes / counts.clamp(min=1.0)
    loss_acc = torch.zeros((), device=acc.device)
    nll_acc = torch.zeros((), device=acc.device)
    filler = real[0] if real else task.empty_batch(acc.device)
    for j, b in enumerate(group):
        weight = 1.0 if b is not None else 0.0
        b = b if b is not None else filler
        sync = j == len(group) - 1
        ctx = contextlib.nullcontext() if sync else acc.no_sync(model)
        with ctx:
            with acc.autocast():
                loss, nll = task.loss(model, b)
            acc.backward(loss * (weight * scale[0]))
        loss_acc = loss_acc + loss.detach() * weight
        nll_acc = nll_acc + nll.detach() * weight
    clip = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else float("inf")
    gnorm = acc.clip_grad_norm_(model.parameters(), clip)
    sums = acc.reduce(torch.stack([loss_acc, nll_acc]), reduction="sum")
    gnorm = torch.as_tensor(gnorm, device=acc.device, dtype=torch.float32).reshape(())
    extra = (telemetry() if telemetry is not None else None) or {}
    parts = [sums / counts, gnorm[None], counts] + [torch.stack([v.float().reshape(()) for v in extra.values()])
                                                     if extra else counts[:0]]
    stats = torch.cat(parts).tolist()  # the one host sync of an update
    loss_v, nll_v, gnorm_v, tokens = stats[:4]
    out = {"loss": loss_v / math.log(2), "nll": nll_v / math.log(2), "grad_norm": gnorm_v, "ntokens": int(tokens)}
    out.update(zip(extra, stats[4:]))
    return out


@torch.no_grad()
def probe_loss(acc, raw_model, group: list[dict | None], task) -> float:
    """Loss (bits per target token, label-smoothed as in training) of ``group`` with the current weights.

    Eval mode and no gradient: no dropout mask is drawn, so the RNG streams (and bit-exact resume) are untouched.
    """
    was_training = raw_model.training
    raw_model.eval()
    total = loss_sums(acc, raw_model, group, task).tolist()
    raw_model.train(was_training)
    return total[0] / max(total[2], 1.0) / math.log(2)


def loss_sums(acc, model, batches, task) -> torch.Tensor:
    """(label-smoothed loss, nll, target tokens) summed over ``batches`` and every process, in the model's mode.

    A ``None`` batch runs a filler that is not counted, so every process runs the same number of forward passes
    (FSDP all-gathers parameters in each).
    """
    sums = torch.zeros(3, device=acc.device)
    for b in batches:
        with acc.autocast():
            loss, nll = task.loss(model, b if b is not None else task.empty_batch(acc.device))
        if b is not None:
            sums += torch.stack([loss.float(), nll.float(), torch.tensor(float(b["ntokens"]), device=acc.device)])
    return acc.reduce(sums, reduction="sum")
