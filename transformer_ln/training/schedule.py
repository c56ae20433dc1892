"""fairseq's inverse-square-root learning-rate schedule, a pure function of the number of finished updates.

    t <  W:  lr(t) = warmup_init_lr + t * (lr - warmup_init_lr) / W
    t >= W:  lr(t) = lr * sqrt(W / t)

The trainer sets lr(t) before update t + 1, as fairseq's ``step_update(num_updates)`` does. It depends only on the
update count, never on the number of processes (accelerate's prepared schedulers step once per process; we keep the
schedule out of ``prepare``). W = 0 means no warmup: lr(t) = lr / sqrt(max(t, 1)).
"""
from __future__ import annotations

import math


def inverse_sqrt_lr(num_updates: int, lr: float, warmup_updates: int, warmup_init_lr: float = 0.0) -> float:
    if warmup_updates > 0 and num_updates < warmup_updates:
        return warmup_init_lr + num_updates * (lr - warmup_init_lr) / warmup_updates
    return lr * math.sqrt(max(warmup_updates, 1) / max(num_updates, 1))
