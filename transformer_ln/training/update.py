"""One optimizer update, as functions: the loss, the accumulated gradient over processes, the probe of new weights.

The recipe follows fairseq and the Admin paper: label-smoothed cross-entropy summed over tokens and divided by the
global number of target tokens (across processes and accumulation steps), an inverse-sqrt schedule set from the
update count, Adam or RAdam. ``accumulate`` computes the gradient and the statistics the divergence guard needs;
the caller decides whether ``optimizer.step()`` follows.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..model.admin import omega_summary
from ..config.run_config import RunConfig
from .losses import label_smoothed_nll_loss
from .schedule import inverse_sqrt_lr


def compute_loss(model, batch: dict, eps: float, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label-smoothed loss sum, nll sum) of one batch."""
    logits = model(batch["src"], batch["tgt_in"])
    return label_smoothed_nll_loss(logits, batch["tgt_out"], eps, pad_id)


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
    params = [p for p in model.parameters() if p.requires_grad]
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
        g["lr"] = lr
    return lr


def empty_batch(device) -> dict:
    """A one-token batch with weight 0: a process without data still joins the collective operations."""
    one = torch.full((1, 2), 4, dtype=torch.long, device=device)
    return {"src": one, "tgt_in": one, "tgt_out": one, "ntokens": 0}


def accumulate(acc, model, raw_model, group: list[dict | None], cfg: RunConfig) -> dict[str, float]:
    """Forward and backward over ``update_freq`` micro-batches; returns the global loss, nll and grad norm (bits).

    Each micro-batch's summed loss is scaled by world / (global target tokens) so that, after DDP averages the
    gradients over processes, the gradient is that of sum(loss) / sum(tokens) over everything in the update.
    A ``None`` micro-batch (this process ran out of batches) repeats a real one with weight 0.
    """
    pad_id = cfg.model.pad_id
    real = [b for b in group if b is not None]
    local_tokens = sum(b["ntokens"] for b in real)
    counts = acc.reduce(torch.tensor([float(local_tokens)], device=acc.device), reduction="sum")
    scale = acc.num_processes / counts.clamp(min=1.0)
    loss_acc = torch.zeros((), device=acc.device)
    nll_acc = torch.zeros((), device=acc.device)
    filler = real[0] if real else empty_batch(acc.device)
    for j, b in enumerate(group):
        weight = 1.0 if b is not None else 0.0
        b = b if b is not None else filler
        sync = j == len(group) - 1
        ctx = contextlib.nullcontext() if sync else acc.no_sync(model)
        with ctx:
            with acc.autocast():
                loss, nll = compute_loss(model, b, cfg.optim.label_smoothing, pad_id)
            acc.backward(loss * (weight * scale[0]))
        loss_acc = loss_acc + loss.detach() * weight
        nll_acc = nll_acc + nll.detach() * weight
    clip = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else float("inf")
    gnorm = acc.clip_grad_norm_(model.parameters(), clip)
    sums = acc.reduce(torch.stack([loss_acc, nll_acc]), reduction="sum")
    gnorm = torch.as_tensor(gnorm, device=acc.device, dtype=torch.float32).reshape(())
    omega = omega_summary(raw_model)  # Admin's omega before this update; None for other schemes
    parts = [sums / counts, gnorm[None], counts] + ([omega] if omega is not None else [])
    stats = torch.cat(parts).tolist()  # the one host sync of an update
    loss_v, nll_v, gnorm_v, tokens = stats[:4]
    out = {"loss": loss_v / math.log(2), "nll": nll_v / math.log(2), "grad_norm": gnorm_v, "ntokens": int(tokens)}
    if omega is not None:
        out.update(omega_min=stats[4], omega_mean=stats[5], omega_max=stats[6])
    return out


@torch.no_grad()
def probe_loss(acc, raw_model, group: list[dict | None], cfg: RunConfig) -> float:
    """Loss (bits per target token, label-smoothed as in training) of ``group`` with the current weights.

    Eval mode and no gradient: no dropout mask is drawn, so the RNG streams (and bit-exact resume) are untouched.
    """
    was_training = raw_model.training
    raw_model.eval()
    total = loss_sums(acc, raw_model, group, cfg).tolist()
    raw_model.train(was_training)
    return total[0] / max(total[2], 1.0) / math.log(2)


def loss_sums(acc, model, batches, cfg: RunConfig) -> torch.Tensor:
    """(label-smoothed loss, nll, target tokens) summed over ``batches`` and every process, in the model's mode.

    A ``None`` batch runs a filler that is not counted, so every process runs the same number of forward passes
    (FSDP all-gathers parameters in each).
    """
    sums = torch.zeros(3, device=acc.device)
    for b in batches:
        with acc.autocast():
            loss, nll = compute_loss(model, b if b is not None else empty_batch(acc.device),
                                     cfg.optim.label_smoothing, cfg.model.pad_id)
        if b is not None:
            sums += torch.stack([loss.float(), nll.float(), torch.tensor(float(b["ntokens"]), device=acc.device)])
    return acc.reduce(sums, reduction="sum")
