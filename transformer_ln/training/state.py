"""Where a run stands (``State``, saved in every checkpoint as its trainer-state file) and the stopping rules."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional


@dataclass
class State:
    """The trainer's position and its bookkeeping between updates; everything a resume needs besides the tensors."""

    update: int = 0
    epoch: int = 1
    batches_in_epoch: int = 0
    tokens: int = 0
    wall_time: float = 0.0
    best_valid_loss: float | None = None
    best_valid_nll: float | None = None
    best_update: int | None = None
    bad_updates: int = 0
    status: str = "running"
    diverged_at: int | None = None
    last_good_update: int = 0
    last_valid_update: int = -1
    last_saved_update: int = -1
    metrics_bytes: int | None = None
    best_pending: bool = False  # this update's validation found a new best: checkpoint it now, as ``best``
    bad_valid_update: int | None = None  # the update whose validation loss failed the divergence check

    @classmethod
    def from_dict(cls, d: dict) -> "State":
        """Known keys only; the ``extra`` dict of checkpoints written before the typed fields is read as fields."""
        names = set(cls.__dataclass_fields__)
        merged = {**(d.get("extra") or {}), **d}
        return cls(**{k: v for k, v in merged.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


def stopped_by(st: State, t) -> Optional[str]:
    """Which rule of ``t`` (a ``TrainConfig``) ended the run: max_updates, max_epochs, max_minutes, or None.

    ``max_minutes`` is a time limit, not a completed recipe (the schedule may have stopped mid-warmup), so the
    summary records it beside the status as ``"stopped": "max_minutes"``.
    """
    if t.max_updates and st.update >= t.max_updates:
        return "max_updates"
    if t.max_epochs and st.epoch > t.max_epochs:
        return "max_epochs"
    if t.max_minutes and st.wall_time >= t.max_minutes * 60:
        return "max_minutes"
    return None


def stop_reason(st: State, t) -> Optional[str]:
    """Why the run has nothing more to do under the stopping rule ``t`` (a ``TrainConfig``), or None."""
    if st.status == "diverged":
        return f"diverged at update {st.diverged_at}"
    rule = stopped_by(st, t)
    if rule == "max_updates":
        return f"train.max_updates={t.max_updates} reached"
    if rule == "max_epochs":
        return f"train.max_epochs={t.max_epochs} done"
    if rule == "max_minutes":
        return f"train.max_minutes={t.max_minutes:g} reached at update {st.update}"
    return None
