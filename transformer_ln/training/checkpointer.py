"""A run's checkpoints, from the trainer's side: when one is written, what ``best`` holds, how many are kept, what a
roll-back loads, and the trainer-state file inside each (the format itself is ``runs.checkpoint``).

Kept weights are good weights: a checkpoint is written only when the weights pass the divergence guard (the caller's
``verdict``), so the newest checkpoint is always the last good one. ``best`` is always weights whose validation loss
was measured: it is promoted only from a checkpoint of the very update whose validation found a new lowest loss, and
the trainer writes that checkpoint at validation time when its save cadence would not (``State.best_pending``). Until
a validation has found one (or in a run without a valid split) there is no ``best``, and readers asking for it get
the newest checkpoint (``runs.checkpoint.resolve``). Under FSDP the whole model and optimizer state are gathered onto
the main process first (``sharding``): one format for every launch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

from torch import nn

from ..errors import UserError
from ..runs import checkpoint as ckpt_lib
from ..runs.rundir import RunDir
from . import sharding
from .state import State


def read_state(ckpt: Path) -> State:
    """The trainer state a checkpoint holds; an unreadable file is one line."""
    try:
        return State.from_dict(json.loads((Path(ckpt) / RunDir.STATE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"checkpoint {ckpt} has an unreadable {RunDir.STATE}: {e}") from None


def apply_optimizer_and_rng(model, optimizer, ckpt: Path, states: tuple[dict, dict], accelerator=None) -> None:
    """Load what ``runs.checkpoint.read_optimizer_and_rng`` read into a prepared optimizer (each process keeps its
    shard under FSDP) and set this process's RNG; a mismatch is one line."""
    optim_state, rng = states
    try:
        sharding.load_optimizer_state(model, optimizer, optim_state, accelerator)
        ckpt_lib.set_rng_state(rng)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"checkpoint {ckpt} does not fit this run's optimizer or RNG: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


class Checkpointer:
    """Writes, promotes, prunes and rolls back the checkpoints of one run.

    Args:
        rundir: the run's ``RunDir`` (every file name comes from it).
        accelerator: the run's ``Accelerator``; every process calls ``save`` and ``roll_back``.
        cfg: the run's ``RunConfig`` (saved in each checkpoint; ``train.keep_last``).
        build_model: makes an empty model of the run's shape (for unsharded copies under FSDP).
        metrics: the run's ``MetricsWriter`` (its size is saved, so a resume cuts it back to the checkpoint).
        record: writes one metrics record (``metrics.jsonl`` and the trackers).
        log: one line for the user.
    """

    def __init__(self, rundir: RunDir, accelerator, cfg, build_model: Callable[[], nn.Module], metrics,
                 record: Callable[[dict], None], log: Callable[[str], None]):
        self.rundir, self.accelerator, self.cfg = rundir, accelerator, cfg
        self.build_model, self.metrics, self.record, self.log = build_model, metrics, record, log

    def latest(self) -> Optional[Path]:
        found = self.rundir.update_checkpoints()
        return found[-1] if found else None

    def save(self, state: State, model: nn.Module, optimizer, verdict: Callable[[], Optional[str]],
             final: bool = False) -> bool:
        """Write a checkpoint of the current weights if ``verdict()`` finds nothing wrong with them; returns whether
        the update is on disk. Failing weights at the end of the run mean the run diverged in its last update(s)."""
        st = state
        if st.update == 0:
            return False
        if st.last_saved_update == st.update and not st.best_pending:
            return True  # this update is on disk already (a save_every and an epoch end on the same update)
        why = verdict()
        if why:
            st.best_pending = False
            self.record({"kind": "not_saved", "update": st.update, "reason": why})
            self.log(f"update {st.update}: checkpoint not written, {why}")
            if final:
                st.status, st.diverged_at = "diverged", st.update
            return False
        st.last_good_update = st.update
        st.last_saved_update = st.update
        best = st.best_pending and st.last_valid_update == st.update  # validated on exactly these weights
        st.best_pending = False
        if best:
            st.best_update = st.update
        saved = {**st.to_dict(), "metrics_bytes": self.metrics.size()}
        acc = self.accelerator
        whole = sharding.full_copy(model, acc, self.build_model)
        optim_state = sharding.full_optimizer_state(model, optimizer, acc)
        path = ckpt_lib.save_checkpoint(self.rundir.path, st.update, whole, optim_state, self.cfg, saved, acc)
        if acc.is_main_process:
            if best:
                ckpt_lib.copy_as(path, RunDir.BEST)
            self.prune()
        acc.wait_for_everyone()
        return True

    def prune(self) -> None:
        ckpt_lib.prune_checkpoints(self.rundir.path, self.cfg.train.keep_last)

    def finish_interrupted_save(self) -> None:
        """A kill after a checkpoint was renamed into place but before ``save`` copied it as ``best`` (and pruned)
        leaves ``best`` one checkpoint behind: finish that save, as the uninterrupted run did."""
        newest_path = self.latest()
        if newest_path is None:
            return
        try:
            newest = read_state(newest_path)
            held = read_state(self.rundir.best).update if self.rundir.best.is_dir() else None
        except UserError:
            return  # the load explains an unreadable checkpoint; an unreadable best is replaced by the next save
        if newest.best_update == newest.update and held != newest.update:
            ckpt_lib.copy_as(newest_path, RunDir.BEST)
            print(f"note: {self.rundir}: copied {newest_path.name} as {RunDir.BEST}, which an interrupted save had "
                  "not done", file=sys.stderr)
        self.prune()

    def roll_back(self, model: nn.Module, diverged_at: Optional[int]) -> None:
        """After divergence the model in memory goes back to the last good (last written) weights."""
        last = self.latest()
        if last is None:
            return
        sharded = sharding.is_sharded(self.accelerator)
        whole = sharding.fresh(self.build_model) if sharded else model
        ckpt_lib.load_weights(whole, last)
        if sharded:  # every process reads the file and keeps its shard
            sharding.load_model_state(model, whole.state_dict(), self.accelerator)
        self.log(f"diverged at update {diverged_at}; rolled back to {last}, the last good weights")

    def describe(self, state: State) -> dict:
        """The checkpoint fields of ``summary.json``."""
        last, best = self.latest(), self.rundir.best
        return {"last_good_checkpoint": str(last.relative_to(self.rundir.path)) if last else None,
                "best_checkpoint": (f"{best.relative_to(self.rundir.path)} (update {state.best_update})"
                                    if best.is_dir() else None)}
