"""The training loop with ``accelerate``: one code path for one process and for many.

``Trainer`` puts the pieces together: the run directory (``rundir``: names, lock, metrics, summary), the update
(``update``: loss, accumulated gradient, probe), the divergence guard (``divergence``) and the checkpoints
(``checkpoint``). Its promises:

- Bit-exact resume: model, optimizer, RNG of every process and the position in the epoch are checkpointed, and
  ``metrics.jsonl`` is cut back to the checkpoint's position, so a resumed run writes what the uninterrupted run
  would have, once.
- Idempotent resume: a finished run resumes to nothing; a larger stopping rule continues where it stopped.
- Kept weights are good weights: see ``divergence``; ``summary.json`` names the last good update and checkpoint.
- One code path for one process, DDP and FSDP2: ``sharding`` gathers the whole state for checkpoints and callbacks,
  and every process runs the same number of forward passes (FSDP all-gathers parameters in each).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..runs import checkpoint as ckpt_lib
from ..atomic import write_text
from ..config.run_config import RunConfig
from .divergence import DivergenceGuard
from ..errors import UserError
from .launcher import exit_when_launcher_dies
from ..model.seq2seq import Seq2SeqTransformer
from ..runs.rundir import MetricsWriter, RunDir, Summary
from . import sharding
from . import update as upd


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


@dataclass
class State:
    """The trainer's position; saved in every checkpoint as trainer_state.json."""

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
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "State":
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


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


class Trainer:
    """Owns the accelerator, model, optimizer, data and the loop; ``run()`` returns the summary dict."""

    def __init__(self, cfg: RunConfig, cpu: bool = False, resume: bool = False, overwrite: bool = False,
                 callbacks: list | None = None, quiet: bool = False):
        from accelerate import Accelerator

        self.cfg, self.resume, self.quiet = cfg, resume, quiet
        cfg.train.require_stop()
        self.callbacks = list(callbacks or [])
        self.rundir = RunDir(cfg.train.out_dir)
        self.run_dir = self.rundir.path
        self.guard = DivergenceGuard(cfg.train.diverge_loss, cfg.train.diverge_patience)
        self.finished: Optional[str] = None
        device_hint = torch.device("cpu") if cpu or not torch.cuda.is_available() else torch.device("cuda")
        mp = upd.resolve_mixed_precision(cfg.train.mixed_precision, device_hint)
        log_with = trackers(cfg.train) or None
        sharding.check_request()
        exit_when_launcher_dies()
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision=mp, log_with=log_with,
                                             project_dir=str(self.run_dir), step_scheduler_with_optimizer=False)
        sharding.check_launch(acc)
        self.sharded = sharding.is_sharded(acc)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != acc.num_processes:
            raise UserError(
                f"the launcher started {world} processes but accelerate sees {acc.num_processes}: they would train "
                "as unsynchronised copies. On a machine without GPUs run `accelerate launch --multi_gpu "
                f"--num_processes {world} -m transformer_ln.train ... --cpu`; on GPUs check `accelerate config`.")
        self.metrics = MetricsWriter(self.rundir.metrics, enabled=acc.is_main_process)
        self.lock = None
        self._agree(self._open_run_dir, overwrite)
        if self.finished:
            return
        try:
            self._set_up(log_with)
        except BaseException:
            self._release()
            raise

    def _set_up(self, log_with) -> None:
        from accelerate.utils import set_seed

        cfg, acc, resume = self.cfg, self.accelerator, self.resume
        set_seed(cfg.train.seed)

        from ..data import prepare_data
        self.data = prepare_data(cfg, self.run_dir, acc, progress=not self.quiet)  # memory-mapped prepared data
        vocab = self.data.tokenizer.get_vocab_size()
        mcfg = cfg.model.to_dict()
        mcfg.update(src_vocab_size=vocab, tgt_vocab_size=vocab)
        self.cfg = cfg = RunConfig.from_dict({**cfg.to_dict(), "model": mcfg,
                                              "data": self.data.data_config.to_dict()})

        self.model = Seq2SeqTransformer(cfg.model)
        self.pad_id = cfg.model.pad_id
        if not len(self.data.splits["train"]):
            raise UserError("the training split is empty after filtering; check the data paths and "
                            "model.max_positions")
        self.sampler = self.data.sampler("train", cfg.train.max_tokens, seed=cfg.train.seed, shuffle=True,
                                         num_shards=acc.num_processes, shard_id=acc.process_index)
        self._epoch_batches: tuple[int, list] = (-1, [])
        self.state = State()
        self.optimizer = upd.build_optimizer(self.model, cfg, acc.device)
        self.model = self.model.to(acc.device)
        restore = None  # (checkpoint, optimizer and RNG states) of a resume, applied after prepare
        if resume:
            restore = self._load_last()
        else:
            self._calibrate()  # Admin profiles the whole model, before any wrapping
        self.raw_model = self.model
        train_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.model, self.optimizer = acc.prepare(train_model, self.optimizer)  # FSDP2 shards raw_model in place
        if self.sharded:
            self.log(sharding.describe(self.raw_model, acc))
        if restore is not None:  # after prepare: FSDP replaces the optimizer's parameters by their shards
            ckpt_lib.apply_optimizer_and_rng(self.raw_model, self.optimizer, *restore, accelerator=acc)
        if acc.is_main_process:  # only now: a resume that fails leaves the run's config.yaml as it was
            cfg.save(self.rundir.config)
        if log_with and acc.is_main_process:
            flat = {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}
            acc.init_trackers("transformer_ln", config={k: v for k, v in flat.items()
                                                        if isinstance(v, (int, float, str, bool))})
        if cfg.train.grad_norms_every:
            from ..diagnostics import GradNormCallback
            self.callbacks.append(GradNormCallback(cfg.train.grad_norms_every))

    # ---------------------------------------------------------------------------------------------- set-up

    def _agree(self, fn, *args) -> None:
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

    def _open_run_dir(self, overwrite: bool) -> None:
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
                self._finish_last_save()
                if not run.has_checkpoints():
                    raise UserError(f"cannot resume: {run} has no complete checkpoint yet (expected "
                                    f"{run.checkpoints}/update_*); start the run again without --resume")
                self._check_resume_config()
                self.finished = self._already_finished()
                run.mark()
                return
            doomed = run.check_fresh(overwrite)
            from ..data.corpus import check_sources

            check_sources(self.cfg.data)  # a mistyped data path fails here, before an old run is deleted
            run.clear(doomed)
        except BaseException:
            self.lock.release()
            raise

    def _finish_last_save(self) -> None:
        """A kill after a checkpoint was renamed into place but before ``save`` copied it as ``best`` (and pruned)
        leaves ``best`` one checkpoint behind: finish that save, as the uninterrupted run did."""
        found = ckpt_lib.update_checkpoints(self.run_dir)
        if not found:
            return
        best = self.rundir.checkpoints / "best"
        try:
            newest = json.loads((found[-1] / "trainer_state.json").read_text())
            held = json.loads((best / "trainer_state.json").read_text()).get("update") if best.is_dir() else None
        except (OSError, ValueError):
            return  # the load explains an unreadable checkpoint; an unreadable best is replaced by the next save
        if newest.get("best_update") == newest.get("update") and held != newest.get("update"):
            ckpt_lib.copy_as(found[-1], "best")
            print(f"note: {self.rundir}: copied {found[-1].name} as best, which an interrupted save had not done",
                  file=sys.stderr)
        ckpt_lib.prune_checkpoints(self.run_dir, self.cfg.train.keep_last)

    def _already_finished(self) -> Optional[str]:
        """A finished run under the same stopping rule resumes to nothing; returns why, or None."""
        summary = self.rundir.read_summary()
        if summary is None:
            return None
        last = ckpt_lib.update_checkpoints(self.run_dir)[-1]
        try:
            st = State.from_dict(json.loads((last / "trainer_state.json").read_text()))
        except (OSError, ValueError, TypeError):
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

    def _check_resume_config(self) -> None:
        """The model must be the one the checkpoints hold (the vocabulary comes from the run's tokenizer)."""
        old = ckpt_lib.load_run_config_from(self.run_dir)
        diff = [k for k, v in self.cfg.model.to_dict().items()
                if old.model.to_dict().get(k) != v and not (k.endswith("vocab_size") and v is None)]
        if diff:
            raise UserError(f"cannot resume {self.run_dir} with a different model config (changed: "
                            f"{', '.join('model.' + k for k in diff)}); drop those overrides or start a new run")

    def _load_last(self) -> tuple:
        """The newest readable checkpoint; a corrupt one is skipped with a warning, never deleted.

        Loads the weights into the unwrapped model and the trainer state; returns ``(checkpoint, (optimizer state,
        RNG state))``, applied once the model and optimizer are prepared.
        """
        errors = []
        for ckpt in reversed(ckpt_lib.update_checkpoints(self.run_dir)):
            try:
                ckpt_lib.load_weights(self.model, ckpt, hint=None)
                states = ckpt_lib.read_optimizer_and_rng(ckpt, self.accelerator.process_index)
                try:
                    self.state = State.from_dict(json.loads((ckpt / "trainer_state.json").read_text()))
                except (OSError, ValueError, TypeError) as e:
                    raise UserError(f"checkpoint {ckpt} has an unreadable trainer_state.json: {e}") from None
            except UserError as e:
                errors.append(str(e))
                self.log(f"warning: {e}; falling back to the checkpoint before it")
                continue
            break
        else:
            raise UserError(f"cannot resume {self.rundir}: no readable checkpoint ({errors[0] if errors else 'none'})")
        st = self.state
        st.status, st.bad_updates, st.diverged_at = "running", 0, None
        dropped = self.metrics.truncate(st.metrics_bytes, st.update)
        self.log(f"resumed from {ckpt} at update {st.update}, epoch {st.epoch}"
                 + (f"; dropped {dropped} line(s) of metrics.jsonl written after it" if dropped else ""))
        return ckpt, states

    def _calibrate(self) -> None:
        """The scheme's data-dependent initialisation (Admin's profiling) on the first global batch.

        Every process builds the same batch from the same seed, so every process ends with the same omega.
        """
        whole = self.data.sampler("train", self.cfg.train.max_tokens, seed=self.cfg.train.seed, shuffle=True)
        whole.set_epoch(1)
        batch = self._collate(next(iter(whole)))
        profile = self.model.scheme.calibrate(self.model, batch["src"], batch["tgt_in"], seed=self.cfg.train.seed)
        if profile is None:
            return
        if self.accelerator.is_main_process:
            write_text(self.rundir.profile, json.dumps(profile, indent=1))
        self.log(f"Admin profile: encoder omega {profile['encoder'][0]:.3f} .. {profile['encoder'][-1]:.3f}, "
                 f"decoder {profile['decoder'][0]:.3f} .. {profile['decoder'][-1]:.3f}")

    # ---------------------------------------------------------------------------------------------- helpers

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

    def _to_device(self, batch: dict) -> dict:
        dev = self.accelerator.device
        pin = dev.type == "cuda"
        return {k: (v.pin_memory().to(dev, non_blocking=True) if pin else v.to(dev))
                if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _collate(self, ix) -> dict | None:
        """The training batch at positions ``ix``, gathered from the memory-mapped split, on the device."""
        if ix is None:
            return None
        return self._to_device(self.data.batch("train", ix))

    def _batches_of_epoch(self, epoch: int) -> list:
        """This process's batches for the epoch (index arrays), padded with ``None`` so every process has the same
        count."""
        if self._epoch_batches[0] != epoch:
            self.sampler.set_epoch(epoch)
            mine: list = self.sampler.shard_arrays()
            per_shard = getattr(self.sampler, "batches_per_shard", len(mine))
            self._epoch_batches = (epoch, mine + [None] * (per_shard - len(mine)))
        return self._epoch_batches[1]

    def _next_group(self) -> list[dict | None]:
        """The micro-batches the next update would train on (the next epoch's first when this one is done)."""
        st, k = self.state, self.cfg.train.update_freq
        batches = self._batches_of_epoch(st.epoch)
        if st.batches_in_epoch < len(batches):
            return [self._collate(ix) for ix in batches[st.batches_in_epoch:st.batches_in_epoch + k]]
        return [self._collate(ix) for ix in self._batches_of_epoch(st.epoch + 1)[:k]]

    # ---------------------------------------------------------------------------------------------- loop

    def run(self) -> dict:
        if self.finished:
            if self.accelerator.is_main_process:
                print(self.finished, file=sys.stderr)
            self._release()
            return self.rundir.read_summary().to_dict()
        try:
            return self._run()
        finally:
            self._release()

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def _run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc, st = self.cfg, self.accelerator, self.state
        t_cfg = cfg.train
        start_wall = time.time() - st.wall_time
        bar = tqdm(total=t_cfg.max_updates or None, initial=st.update, disable=not acc.is_main_process or self.quiet,
                   desc=f"{cfg.model.residual} {cfg.model.n_enc_layers}L-{cfg.model.n_dec_layers}L", unit="upd",
                   dynamic_ncols=True)
        if self.resume and stop_reason(st, t_cfg):
            self.log(f"nothing left to train ({stop_reason(st, t_cfg)}); finishing the run")
        while stop_reason(st, t_cfg) is None:
            batches = self._batches_of_epoch(st.epoch)
            if st.batches_in_epoch >= len(batches):
                self._end_epoch()
                continue
            group_idx = batches[st.batches_in_epoch:st.batches_in_epoch + t_cfg.update_freq]
            group = [self._collate(ix) for ix in group_idx]
            lr = upd.set_lr(self.optimizer, st.update, cfg)
            t0 = time.time()
            self.model.train()
            stats = upd.accumulate(acc, self.model, self.raw_model, group, cfg)
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
                if t_cfg.save_every and st.update % t_cfg.save_every == 0:
                    self.save()
            st.wall_time = time.time() - start_wall
            if st.status != "diverged" and st.batches_in_epoch >= len(batches):
                self._end_epoch()
        bar.close()
        st.wall_time = time.time() - start_wall
        why = stop_reason(st, t_cfg)
        if st.status != "diverged":
            if st.last_valid_update != st.update:
                self.validate()
            self.save(final=True)
        if st.status == "diverged":
            self._roll_back()
        else:
            st.status = "completed"
        summary = self.summary(why if st.status == "completed" else stop_reason(st, t_cfg))
        if summary["stopped"] == "max_minutes" and not self.quiet and acc.is_main_process:
            print(f"note: stopped by the time limit train.max_minutes={t_cfg.max_minutes:g} at update {st.update} "
                  f"(warmup {self.cfg.optim.warmup_updates}); resume with a larger limit to go on", file=sys.stderr)
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
        record = {"kind": "train", "update": st.update, "epoch": st.epoch, "loss": stats["loss"],
                  "nll": stats["nll"], "lr": lr, "grad_norm": stats["grad_norm"],
                  "tokens_per_s": stats["ntokens"] / max(dt, 1e-9), "ntokens": stats["ntokens"]}
        record.update({k: v for k, v in stats.items() if k.startswith("omega_")})
        self.write_metrics(record)
        bar.update(1)
        if st.update % self.cfg.train.log_every == 0 or st.update == 1:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        first = next((b for b in group if b is not None), None)
        model = self.raw_model
        if self.sharded:  # a callback sees the whole model: an unsharded copy, on the main process only
            if not any(st.update % getattr(cb, "every", 1) == 0 for cb in self.callbacks):
                return
            model = sharding.full_copy(self.raw_model, self.accelerator, lambda: Seq2SeqTransformer(self.cfg.model))
            if model is None:
                return
            model = model.to(self.accelerator.device)
        for cb in self.callbacks:
            cb.on_update_end(UpdateContext(st.update, model,
                                           first or upd.empty_batch(self.accelerator.device), self.write_metrics))

    def _end_epoch(self) -> None:
        st = self.state
        st.epoch += 1
        st.batches_in_epoch = 0
        if st.last_valid_update != st.update:
            self.validate()
        if self.cfg.train.save_epochs:
            self.save()

    def _roll_back(self) -> None:
        """After divergence the model in memory goes back to the last good (last written) weights."""
        found = ckpt_lib.update_checkpoints(self.run_dir)
        if found:
            whole = sharding.fresh(lambda: Seq2SeqTransformer(self.cfg.model)) if self.sharded else self.raw_model
            ckpt_lib.load_weights(whole, found[-1])
            if self.sharded:  # every process reads the file and keeps its shard
                sharding.load_model_state(self.raw_model, whole.state_dict(), self.accelerator)
            self.log(f"diverged at update {self.state.diverged_at}; rolled back to {found[-1]}, the last good "
                     "weights")

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Validation loss, nll and perplexity over the whole valid split (sharded over processes)."""
        if not len(self.data.splits.get("valid") or ()):
            return None
        acc, st = self.accelerator, self.state
        st.last_valid_update = st.update
        sampler = self.data.sampler("valid", self.cfg.train.max_tokens, seed=0, shuffle=False,
                                    num_shards=acc.num_processes, shard_id=acc.process_index)
        mine = sampler.shard_arrays()
        mine += [None] * (sampler.batches_per_shard - len(mine))  # the same forward passes on every process
        self.raw_model.eval()
        batches = (self._to_device(self.data.batch("valid", ix)) if ix is not None else None for ix in mine)
        sums = upd.loss_sums(acc, self.raw_model, batches, self.cfg).tolist()
        loss = sums[0] / max(sums[2], 1) / math.log(2)
        nll = sums[1] / max(sums[2], 1) / math.log(2)
        rec = {"kind": "valid", "update": st.update, "epoch": st.epoch, "loss": loss, "nll": nll,
               "ppl": 2 ** min(nll, 1000.0)}
        bad = self.guard.verdict(loss)
        if bad:
            rec["diverged"] = bad
            st.extra["bad_valid_update"] = st.update
        self.write_metrics(rec)
        self.log(f"valid @ update {st.update}: loss {loss:.3f}  nll {nll:.3f}  ppl {rec['ppl']:.2f}"
                 + (f"  ({bad}: not a candidate for best)" if bad else ""))
        if not bad and (st.best_valid_loss is None or loss < st.best_valid_loss):
            st.best_valid_loss, st.best_valid_nll = loss, nll
            st.extra["best_pending"] = True
        return rec

    def save(self, final: bool = False) -> bool:
        """Write a checkpoint of the current weights if they pass the guard; returns whether it was written.

        Failing weights at the end of the run mean the run diverged in its last update(s).
        """
        st = self.state
        if st.update == 0:
            return False
        if st.last_saved_update == st.update and not st.extra.get("best_pending"):
            return True  # this update is on disk already (a save_every and an epoch end on the same update)
        why = None
        if st.extra.get("bad_valid_update") == st.update:
            why = "the validation loss failed the divergence check"
        else:
            probe = upd.probe_loss(self.accelerator, self.raw_model, self._next_group(), self.cfg)
            why = self.guard.verdict(probe)
            if why:
                why = f"the next batch's {why}"
        if why:
            st.extra.pop("best_pending", None)
            self.write_metrics({"kind": "not_saved", "update": st.update, "reason": why})
            self.log(f"update {st.update}: checkpoint not written, {why}")
            if final:
                st.status, st.diverged_at = "diverged", st.update
            return False
        st.last_good_update = st.update
        st.last_saved_update = st.update
        best = st.extra.pop("best_pending", False) or not (self.rundir.checkpoints / "best").is_dir()
        if best:
            st.best_update = st.update
        state = dict(st.__dict__)
        state["extra"] = {k: v for k, v in st.extra.items()}
        state["metrics_bytes"] = self.metrics.size()
        path = ckpt_lib.save_checkpoint(self.run_dir, st.update, self.raw_model, self.optimizer, self.cfg, state,
                                        self.accelerator)
        if self.accelerator.is_main_process:
            if best:
                ckpt_lib.copy_as(path, "best")
            ckpt_lib.prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
        self.accelerator.wait_for_everyone()
        return True

    def summary(self, stop: Optional[str] = None) -> dict:
        st, m = self.state, self.cfg.model
        found = ckpt_lib.update_checkpoints(self.run_dir)
        best = self.rundir.checkpoints / "best"
        return Summary(
            status=st.status, updates=st.update, diverged_at=st.diverged_at, best_valid_loss=st.best_valid_loss,
            best_valid_nll=st.best_valid_nll, last_good_update=st.last_good_update,
            last_good_checkpoint=str(found[-1].relative_to(self.run_dir)) if found else None,
            best_checkpoint=(f"{best.relative_to(self.run_dir)} (update {st.best_update})"
                             if best.is_dir() else None),
            stop_reason=stop, stopped=None if st.status == "diverged" else stopped_by(st, self.cfg.train),
            epochs_started=st.epoch, tokens=st.tokens, wall_time_s=round(st.wall_time, 2),
            residual=m.residual, n_enc_layers=m.n_enc_layers, n_dec_layers=m.n_dec_layers, lr=self.cfg.optim.lr,
            warmup_updates=self.cfg.optim.warmup_updates, seed=self.cfg.train.seed,
            processes=self.accelerator.num_processes,
            distributed=self.accelerator.distributed_type.value).to_dict()
