"""Opening a run directory for training, and picking up where an interrupted run stopped.

A fresh run locks the directory and deletes only what runs write (``RunDir``). A resume locks it, finishes what a
kill interrupted (a half-written checkpoint, a ``best`` not yet copied), refuses a changed model, refuses changed
settings that would change the training trajectory (``TRAJECTORY``: seed, batch size, update frequency, optimizer and
schedule) unless they are named on purpose in ``ALLOW_CHANGES`` (``TRANSFORMER_LN_RESUME_CHANGES=train.seed,optim.lr``
or ``=all``; after divergence changing them is the point, and it is only noted), recognises a run with nothing left to
do (the same stopping rule: it resumes to nothing) and loads the newest readable checkpoint, skipping a corrupt one
with a warning and never deleting it. Stopping rules, logging, validation and checkpoint cadence may change freely.
Every process reaches the same verdict: the main one decides and the others are told (``agree``).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Optional

from ..config.run_config import RunConfig
from ..errors import UserError
from ..runs import checkpoint as ckpt_lib
from ..runs.rundir import RunDir
from .checkpointer import Checkpointer, read_state
from .state import State, stop_reason


# what a resumed run must share with the run it continues to compute the same updates (and every optim.* key)
TRAJECTORY = ("train.seed", "train.max_tokens", "train.update_freq")
ALLOW_CHANGES = "TRANSFORMER_LN_RESUME_CHANGES"  # comma-separated keys (or "all") a resume may change on purpose


def trajectory_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """``key old -> new`` for every setting in ``TRAJECTORY`` or ``optim`` that differs between the configs."""
    def value(cfg: RunConfig, key: str):
        section, name = key.split(".")
        return getattr(getattr(cfg, section), name)

    keys = [*TRAJECTORY, *(f"optim.{k}" for k in new.optim.to_dict())]
    return [f"{k} {value(old, k)!r} -> {value(new, k)!r}" for k in keys if value(old, k) != value(new, k)]


class RunOpening:
    """The start of a run in ``rundir``: ``open()`` once on construction of the trainer, ``load_last`` on a resume,
    ``release()`` at the end (the lock)."""

    def __init__(self, rundir: RunDir, cfg: RunConfig, accelerator, resume: bool):
        self.rundir, self.cfg, self.accelerator, self.resume = rundir, cfg, accelerator, resume
        self.lock = None
        self.finished: Optional[str] = None  # why a resumed run has nothing to do, or None

    def open(self, overwrite: bool, checkpointer: Checkpointer) -> Optional[str]:
        """Lock and check the directory on the main process; returns why the run is already finished, or None."""
        self.agree(self._open, overwrite, checkpointer)
        return self.finished

    def agree(self, fn: Callable, *args) -> None:
        """Run ``fn`` on the main process; every process raises its ``UserError``, or none does."""
        acc = self.accelerator
        err = None
        if acc.is_main_process:
            try:
                fn(*args)
            except UserError as e:
                err = str(e)
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            err, self.finished = broadcast_object_list([err, self.finished])
        if err is not None:
            raise UserError(err)
        acc.wait_for_everyone()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _open(self, overwrite: bool, checkpointer: Checkpointer) -> None:
        """Lock the directory, then: resume needs checkpoints; a fresh run deletes only what runs write."""
        run = self.rundir
        if self.resume:
            if not run.path.is_dir():
                raise UserError(f"cannot resume: run directory {run} does not exist")
        else:
            run.create()
        self.lock = run.lock().acquire()
        if self.lock.note:
            print(self.lock.note, file=sys.stderr)
        try:
            if self.resume:
                for what in run.tidy_checkpoints():
                    print(f"note: {run}: {what} (left by an interrupted checkpoint write)", file=sys.stderr)
                checkpointer.finish_interrupted_save()
                if not run.has_checkpoints():
                    raise UserError(f"cannot resume: {run} has no complete checkpoint yet (expected "
                                    f"{run.checkpoints}/{RunDir.UPDATE_PREFIX}*); start the run again without "
                                    "--resume")
                self._check_model()
                self._check_trajectory()
                self.finished = self._already_finished()
                run.mark()
                return
            doomed = run.check_fresh(overwrite)
            from .task import get_task

            get_task(self.cfg).check_sources()  # a mistyped data path fails here, before an old run is deleted
            run.clear(doomed)
        except BaseException:
            self.lock.release()
            raise

    def _already_finished(self) -> Optional[str]:
        """A finished run under the same stopping rule resumes to nothing; returns why, or None."""
        summary = self.rundir.read_summary()
        if summary is None:
            return None
        try:
            st = read_state(self.rundir.update_checkpoints()[-1])
        except UserError:
            return None  # the full load explains what is wrong with it
        if summary.updates != st.update and summary.status != "diverged":
            return None
        if summary.status == "diverged":
            if self._changed_settings():
                return None  # new optim/train settings: continue from the last good checkpoint
            return (f"{self.rundir} diverged at update {summary.diverged_at}; its last good checkpoint is "
                    f"{summary.last_good_checkpoint}. Resuming with the same settings would diverge again: change "
                    "optim.* or train.* overrides to continue from it, or start a new run")
        st.status = "running"
        why = stop_reason(st, self.cfg.train)
        if why is None:
            return None
        return (f"nothing to do: {self.rundir} is finished ({why}, {st.update} updates); raise the stopping rule "
                f"(e.g. train.max_updates={st.update * 2}) to train further")

    def _changed_settings(self) -> bool:
        try:
            old = RunConfig.load(self.rundir.config)
        except UserError:
            return True

        def train_part(c: RunConfig) -> dict:
            return {k: v for k, v in c.train.to_dict().items() if k != "out_dir"}

        return old.optim != self.cfg.optim or train_part(old) != train_part(self.cfg)

    def _check_model(self) -> None:
        """The model must be the one the checkpoints hold (the vocabulary comes from the run's tokenizer)."""
        old = ckpt_lib.load_run_config_from(self.rundir.path)
        diff = [k for k, v in self.cfg.model.to_dict().items()
                if old.model.to_dict().get(k) != v and not (k.endswith("vocab_size") and v is None)]
        if diff:
            raise UserError(f"cannot resume {self.rundir} with a different model config (changed: "
                            f"{', '.join('model.' + k for k in diff)}); drop those overrides or start a new run")

    def _check_trajectory(self) -> None:
        """Refuse settings that change what the next updates compute, unless allowed by name (``ALLOW_CHANGES``)."""
        changed = trajectory_changes(ckpt_lib.load_run_config_from(self.rundir.path), self.cfg)
        if not changed:
            return
        summary = self.rundir.read_summary()
        allowed = {k.strip() for k in os.environ.get(ALLOW_CHANGES, "").split(",") if k.strip()}
        keys = [c.split(" ")[0] for c in changed]
        if summary is not None and summary.status == "diverged" or "all" in allowed or set(keys) <= allowed:
            print(f"note: resuming {self.rundir} with {', '.join(changed)}: from here it trains differently from the "
                  "run so far", file=sys.stderr)
            return
        raise UserError(f"cannot resume {self.rundir} with settings that change its training trajectory: "
                        f"{', '.join(changed)}; drop those overrides to continue exactly, or run `{ALLOW_CHANGES}="
                        f"{','.join(keys)} transformer-ln train --resume {self.rundir} ...` to change them on purpose")

    def load_last(self, model, metrics, log: Callable[[str], None]) -> tuple[State, tuple]:
        """The newest readable checkpoint; a corrupt one is skipped with a warning, never deleted.

        Loads the weights into the unwrapped ``model``; returns the trainer state and ``(checkpoint, (optimizer
        state, RNG state))``, applied once the model and optimizer are prepared (``apply_optimizer_and_rng``).
        ``metrics.jsonl`` is cut back to what the checkpoint had seen.
        """
        errors = []
        for ckpt in reversed(self.rundir.update_checkpoints()):
            try:
                ckpt_lib.load_weights(model, ckpt, hint=None)
                states = ckpt_lib.read_optimizer_and_rng(ckpt, self.accelerator.process_index)
                st = read_state(ckpt)
            except UserError as e:
                errors.append(str(e))
                log(f"warning: {e}; falling back to the checkpoint before it")
                continue
            break
        else:
            raise UserError(f"cannot resume {self.rundir}: no readable checkpoint ({errors[0] if errors else 'none'})")
        st.status, st.bad_updates, st.diverged_at = "running", 0, None
        dropped = metrics.truncate(st.metrics_bytes, st.update)
        log(f"resumed from {ckpt} at update {st.update}, epoch {st.epoch}"
            + (f"; dropped {dropped} line(s) of metrics.jsonl written after it" if dropped else ""))
        return st, (ckpt, states)
