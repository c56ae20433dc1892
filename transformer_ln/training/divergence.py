"""The divergence guard: whether an update may be committed, and whether weights may be kept.

A run that diverges is a result, and its kept checkpoints must still be the last good weights. So nothing is
decided after the fact:

- before ``optimizer.step()``: the update's loss (computed with the current weights) must be finite and at most
  ``train.diverge_loss``, and its gradient norm finite; otherwise the update is skipped, and
  ``train.diverge_patience`` skipped updates in a row end the run as ``"diverged"``;
- before a checkpoint is written or promoted to ``best``: the loss of the *next* batch with the new weights (a
  forward pass in eval mode, no randomness drawn) and, where it was just measured, the validation loss pass the
  same test. Weights that fail are never written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DivergenceGuard:
    max_loss: float
    patience: int

    def verdict(self, loss: float, grad_norm: float | None = None) -> Optional[str]:
        """``None`` when good, else the reason in words (for the log and metrics.jsonl)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if loss > self.max_loss:
            return f"loss {loss:.4g} bits is above train.diverge_loss={self.max_loss:g}"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"gradient norm is {grad_norm}"
        return None

    def exhausted(self, bad_in_a_row: int) -> bool:
        return bad_in_a_row >= self.patience
