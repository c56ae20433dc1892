"""The training loop with ``accelerate``: one code path for one process and for many, for every task.

``Trainer`` is the loop; its parts live beside it: the task (``task``: data, model, loss, end-of-run score), the
batches (``batches``), one update (``update``), the divergence guard (``divergence``), validation and the probe
(``validator``), checkpoints (``checkpointer``), the start of a run and resume (``resume``), FSDP (``sharding``).
Its promises:

- Bit-exact resume: model, optimizer, RNG of every process and the position in the epoch are checkpointed, and
  ``metrics.jsonl`` is cut back to the checkpoint's position, so a resumed run writes what the uninterrupted run
  would have, once.
- Idempotent resume: a finished run resumes to nothing; a larger stopping rule continues where it stopped.
- Kept weights are good weights: see ``checkpointer``; ``summary.json`` names the last good update and checkpoint.
- ``best`` holds validated weights: a validation that finds a new lowest loss checkpoints its own update then
  (whatever ``train.save_every`` says), and only such a checkpoint becomes ``best``.
- A resume refuses settings that change the trajectory (seed, batch, update frequency, ``optim.*``) unless named on
  purpose (``resume``); a model that cannot fit is refused before it is built (``memory``).
- One code path for one process, DDP and FSDP2: ``sharding`` gathers the whole state for checkpoints and callbacks,
  and every process runs the same number of forward passes (FSDP all-gathers parameters in each).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..atomic import write_text
from ..config.run_config import RunConfig
from ..errors import UserError
from ..runs.rundir import MetricsWriter, RunDir
from ..runs.summary import Summary
from . import sharding
from . import update as upd
from .batches import EpochBatches
from .checkpointer import Checkpointer, apply_optimizer_and_rng
from .divergence import DivergenceGuard
from .launcher import exit_when_launcher_dies
from .memory import check_fits, local_processes
from .resume import RunOpening
from .state import State, stop_reason, stopped_by
from .task import get_task
from .validator import Validator


class Pace:
    """The time a run stopping on ``train.max_updates`` will take, said once ``after`` updates past the first
    (slower) one of this process, at the pace measured so far; validation, checkpoints and the test score add to it."""

    def __init__(self, start: int, after: int = 10):
        self.start, self.after, self.t_first = start, after, None

    def estimate(self, update: int, max_updates: int) -> str | None:
        done, left = update - self.start - 1, max_updates - update
        if done == 0:
            self.t_first = time.time()
        elif done == self.after and left > 0 and self.t_first is not None:
            pace = (time.time() - self.t_first) / self.after
            return (f"estimate: {pace:.2f} s/update over updates {self.start + 2}-{update}, so about "
                    f"{pace * left / 60:.1f} min for the {left} left to train.max_updates={max_updates} "
                    "(validation, checkpoints and the test score add to it)")
        return None


@dataclass
class UpdateContext:
    """What a callback sees after each optimizer update.

    ``model`` is the whole, unwrapped model. Under FSDP it is an unsharded copy gathered on the main process, and
    callbacks run there only, on the updates a callback asks for with an ``every`` attribute (default: each one).
    """

    update: int
    model: torch.nn.Module
    batch: dict
    log: Callable[[dict], None]


def trackers(t) -> list[str]:
    """accelerate trackers asked for by ``train.trackers`` (and ``train.tensorboard``), offline by default.

    A tracker whose package is missing is one line before any work, not a failure deep in accelerate.
    """
    import accelerate.tracking as tracking

    names = list(dict.fromkeys([*t.trackers, *(["tensorboard"] if t.tensorboard else [])]))
    missing = [n for n in names if not getattr(tracking, f"is_{n}_available", lambda: False)()]
    if missing:
        raise UserError(f"train.trackers: {', '.join(missing)} not installed (pip install {' '.join(missing)}); "
                        f"installed: {', '.join(tracking.get_available_trackers()) or 'none'}. Every run logs to "
                        "metrics.jsonl anyway")
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user says otherwise
    return names


def check_world(acc) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != acc.num_processes:
        raise UserError(
            f"the launcher started {world} processes but accelerate sees {acc.num_processes}: they would train "
            "as unsynchronised copies. On a machine without GPUs run `accelerate launch --multi_gpu "
            f"--num_processes {world} -m transformer_ln.train ... --cpu`; on GPUs check `accelerate config`.")


class Trainer:
    """Owns the accelerator, model, optimizer and the loop; ``run()`` returns the summary dict."""

    def __init__(self, cfg: RunConfig, cpu: bool = False, resume: bool = False, overwrite: bool = False,
                 callbacks: list | None = None, quiet: bool = False):
        from accelerate import Accelerator

        self.cfg, self.resume, self.quiet = cfg, resume, quiet
        cfg.train.require_stop()
        self.callbacks = list(callbacks or [])
        self.task = get_task(cfg)
        self.rundir = RunDir(cfg.train.out_dir)
        self.run_dir = self.rundir.path
        self.guard = DivergenceGuard(cfg.train.diverge_loss, cfg.train.diverge_patience)
        device_hint = torch.device("cpu") if cpu or not torch.cuda.is_available() else torch.device("cuda")
        mp = upd.resolve_mixed_precision(cfg.train.mixed_precision, device_hint)
        log_with = trackers(cfg.train) or None
        sharding.check_request()
        exit_when_launcher_dies()
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision=mp, log_with=log_with,
                                             project_dir=str(self.run_dir), step_scheduler_with_optimizer=False)
        sharding.check_launch(acc)
        self.sharded = sharding.is_sharded(acc)
        check_world(acc)
        self.metrics = MetricsWriter(self.rundir.metrics, enabled=acc.is_main_process)
        self.checkpointer = Checkpointer(self.rundir, acc, cfg, lambda: self.task.build_model(self.cfg.model),
                                         self.metrics, self.write_metrics, self.log)
        self.opening = RunOpening(self.rundir, cfg, acc, resume)
        self.finished = self.opening.open(overwrite, self.checkpointer)
        if self.finished:
            return
        try:
            self._set_up(log_with)
        except BaseException:
            self.opening.release()
            raise

    def _set_up(self, log_with) -> None:
        from accelerate.utils import set_seed

        acc = self.accelerator
        set_seed(self.cfg.train.seed)
        self.data = self.task.prepare(self.run_dir, acc, progress=not self.quiet)
        self.cfg = self.checkpointer.cfg = cfg = self.task.cfg  # completed by the data (the vocabulary)
        warn = self.task.over_budget(self.data, cfg.train.max_tokens)
        if warn and acc.is_main_process:
            print(f"warning: {warn}", file=sys.stderr)
        check_fits(self.task.build_model, cfg.model, acc.device, local_processes(acc), self.sharded)  # no alloc
        self.model = self.task.build_model(cfg.model)
        self.batches = EpochBatches(self.data, cfg.train.max_tokens, cfg.train.seed, acc)
        self.validator = Validator(self.data, self.task, acc, cfg.train.max_tokens, self.guard,
                                   self.batches.to_device, cfg.train.valid_max_sentences)
        self.state = State()
        self.optimizer = upd.build_optimizer(self.model, cfg, acc.device)
        self.model = self.model.to(acc.device)
        restore = None  # (checkpoint, optimizer and RNG states) of a resume, applied after prepare
        if self.resume:
            self.state, restore = self.opening.load_last(self.model, self.metrics, self.log)
        else:
            self._calibrate()  # e.g. Admin's profiling of the whole model, before any wrapping
        self.raw_model = self.model
        scheme = getattr(self.raw_model, "scheme", None)
        self.telemetry = (lambda: scheme.update_stats(self.raw_model)) if scheme is not None else None
        train_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.model, self.optimizer = acc.prepare(train_model, self.optimizer)  # FSDP2 shards raw_model in place
        if self.sharded:
            self.log(sharding.describe(self.raw_model, acc))
        if restore is not None:  # after prepare: FSDP replaces the optimizer's parameters by their shards
            apply_optimizer_and_rng(self.raw_model, self.optimizer, *restore, accelerator=acc)
        if acc.is_main_process:  # only now: a resume that fails leaves the run's config.yaml as it was
            cfg.save(self.rundir.config)
        if log_with and acc.is_main_process:
            flat = {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}
            acc.init_trackers("transformer_ln", config={k: v for k, v in flat.items()
                                                        if isinstance(v, (int, float, str, bool))})
        if cfg.train.grad_norms_every:
            from ..diagnostics import GradNormCallback
            self.callbacks.append(GradNormCallback(cfg.train.grad_norms_every))

    def _calibrate(self) -> None:
        """The scheme's data-dependent initialisation on the first global batch (the same on every process, so
        every process ends with the same weights); what it measured is kept as the run's profile."""
        scheme = getattr(self.model, "scheme", None)
        if scheme is None:
            return
        inputs = self.task.inputs(self.batches.first_global_batch())
        profile = scheme.calibrate(self.model, *inputs, seed=self.cfg.train.seed)
        if profile is None:
            return
        if self.accelerator.is_main_process:
            write_text(self.rundir.profile, json.dumps(profile, indent=1))
        self.log(scheme.calibration_note(profile))

    def log(self, text: str) -> None:
        if self.accelerator.is_main_process and not self.quiet:
            from tqdm.auto import tqdm
            tqdm.write(text)

    def write_metrics(self, record: dict) -> None:
        self.metrics.write(record)
        if self.accelerator.is_main_process and self.accelerator.trackers:
            step = record.get("update", self.state.update)
            self.accelerator.log({f"{record.get('kind', 'x')}/{k}": v for k, v in record.items()
                                  if isinstance(v, (int, float)) and k != "update"}, step=step)

    # ---------------------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        try:
            if self.finished:
                if self.accelerator.is_main_process:
                    print(self.finished, file=sys.stderr)
                return self.rundir.read_summary().to_dict()
            return self._run()
        finally:
            self.opening.release()

    def _run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc, st, t_cfg = self.cfg, self.accelerator, self.state, self.cfg.train
        start_wall = time.time() - st.wall_time
        bar = tqdm(total=t_cfg.max_updates or None, initial=st.update, disable=not acc.is_main_process or self.quiet,
                   desc=self.task.describe(), unit="upd", dynamic_ncols=True)
        self._pace = Pace(st.update)
        if self.resume and stop_reason(st, t_cfg):
            self.log(f"nothing left to train ({stop_reason(st, t_cfg)}); finishing the run")
        while stop_reason(st, t_cfg) is None:
            batches = self.batches.of_epoch(st.epoch)
            if st.batches_in_epoch >= len(batches):
                self._end_epoch()
                continue
            group_idx = batches[st.batches_in_epoch:st.batches_in_epoch + t_cfg.update_freq]
            group = [self.batches.collate(ix) for ix in group_idx]
            lr = upd.set_lr(self.optimizer, st.update, cfg)
            t0 = time.time()
            self.model.train()
            stats = upd.accumulate(acc, self.model, group, cfg, self.task, self.telemetry)
            st.batches_in_epoch += len(group_idx)
            bad = self.guard.verdict(stats["loss"], stats["grad_norm"])
            if bad:
                self._skip(stats, bad)
            else:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                st.last_good_update = st.update  # the weights this update's loss was computed with were good
                st.bad_updates = 0
                st.update += 1
                st.tokens += stats["ntokens"]
                self._record(stats, lr, time.time() - t0, group, bar)
                st.wall_time = time.time() - start_wall
                if t_cfg.valid_every and st.update % t_cfg.valid_every == 0:
                    self.validate()
                if t_cfg.save_every and st.update % t_cfg.save_every == 0 or st.best_pending:
                    self.save()  # a new best is checkpointed when validated: ``best`` holds validated weights
            st.wall_time = time.time() - start_wall
            if st.status != "diverged" and st.batches_in_epoch >= len(batches):
                self._end_epoch()
                st.wall_time = time.time() - start_wall  # its validation counts: a limit met there ends the run
        bar.close()
        st.wall_time = time.time() - start_wall
        why = stop_reason(st, t_cfg)
        if st.status != "diverged":
            if st.last_valid_update != st.update:
                self.validate()
            self.save(final=True)
        if st.status == "diverged":
            self.checkpointer.roll_back(self.raw_model, st.diverged_at)
        else:
            st.status = "completed"
        summary = self.summary(why if st.status == "completed" else stop_reason(st, t_cfg))
        if summary["stopped"] == "max_minutes" and not self.quiet and acc.is_main_process:
            print(f"note: stopped by the time limit train.max_minutes={t_cfg.max_minutes:g} at update {st.update} "
                  f"(warmup {cfg.optim.warmup_updates}); resume with a larger limit to go on", file=sys.stderr)
        if acc.is_main_process:
            Summary.from_dict(summary).save(self.rundir.summary)
        if acc.trackers:
            acc.end_training()
        return summary

    def _skip(self, stats: dict, why: str) -> None:
        st, t_cfg = self.state, self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        st.bad_updates += 1
        self.write_metrics({"kind": "skipped", "update": st.update + 1, "epoch": st.epoch,
                            "loss": stats["loss"] if math.isfinite(stats["loss"]) else None,
                            "grad_norm": stats["grad_norm"] if math.isfinite(stats["grad_norm"]) else None,
                            "reason": why, "bad_in_a_row": st.bad_updates})
        self.log(f"update {st.update + 1}: {why}; skipped ({st.bad_updates}/{t_cfg.diverge_patience})")
        if self.guard.exhausted(st.bad_updates):
            st.status, st.diverged_at = "diverged", st.update + 1

    def _record(self, stats: dict, lr: float, dt: float, group: list, bar) -> None:
        st = self.state
        known = ("loss", "nll", "grad_norm", "ntokens")
        record = {"kind": "train", "update": st.update, "epoch": st.epoch, "loss": stats["loss"],
                  "nll": stats["nll"], "lr": lr, "grad_norm": stats["grad_norm"],
                  "tokens_per_s": stats["ntokens"] / max(dt, 1e-9), "ntokens": stats["ntokens"]}
        record.update({k: v for k, v in stats.items() if k not in known})  # the scheme's update_stats
        self.write_metrics(record)
        bar.update(1)
        if note := self._pace.estimate(st.update, self.cfg.train.max_updates):
            self.log(note)
        if st.update % self.cfg.train.log_every == 0 or st.update == 1:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        first = next((b for b in group if b is not None), None)
        model = self.raw_model
        if self.sharded:  # a callback sees the whole model: an unsharded copy, on the main process only
            if not any(st.update % getattr(cb, "every", 1) == 0 for cb in self.callbacks):
                return
            model = sharding.full_copy(self.raw_model, self.accelerator, self.checkpointer.build_model)
            if model is None:
                return
            model = model.to(self.accelerator.device)
        for cb in self.callbacks:
            cb.on_update_end(UpdateContext(st.update, model, first or self.task.empty_batch(self.accelerator.device),
                                           self.write_metrics))

    def _end_epoch(self) -> None:
        st = self.state
        st.epoch += 1
        st.batches_in_epoch = 0
        if st.last_valid_update != st.update:
            self.validate()
        if self.cfg.train.save_epochs or st.best_pending:
            self.save()

    def validate(self) -> dict | None:
        return self.validator.validate(self.raw_model, self.state, self.write_metrics, self.log)

    def save(self, final: bool = False) -> bool:
        st, k = self.state, self.cfg.train.update_freq
        probe = lambda: self.batches.next_group(st.epoch, st.batches_in_epoch, k)  # noqa: E731
        return self.checkpointer.save(st, self.raw_model, self.optimizer,
                                      lambda: self.validator.verdict(self.raw_model, st, probe), final)

    def summary(self, stop: str | None = None) -> dict:
        st, acc = self.state, self.accelerator
        return Summary(
            status=st.status, updates=st.update, diverged_at=st.diverged_at, best_valid_loss=st.best_valid_loss,
            best_valid_nll=st.best_valid_nll, last_good_update=st.last_good_update,
            **self.checkpointer.describe(st), stop_reason=stop,
            stopped=None if st.status == "diverged" else stopped_by(st, self.cfg.train), epochs_started=st.epoch,
            tokens=st.tokens, wall_time_s=round(st.wall_time, 2), **self.task.summary_fields(),
            lr=self.cfg.optim.lr, warmup_updates=self.cfg.optim.warmup_updates, seed=self.cfg.train.seed,
            processes=acc.num_processes, distributed=acc.distributed_type.value).to_dict()
