"""``transformer-ln train`` and ``accelerate launch -m transformer_ln.train``: the command line of the trainer.

The loop is ``transformer_ln.trainer``; one update is ``transformer_ln.update``; the run directory (names, lock,
metrics, summary) is ``transformer_ln.rundir``; the divergence guard is ``transformer_ln.divergence``. A run that
diverges is a result: ``summary.json`` says ``"status": "diverged"`` and names the last good update and checkpoint,
the only weights that were kept.
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import RunConfig
from .errors import UserError
from .rundir import RunDir
from .trainer import State, Trainer, UpdateContext  # noqa: F401  (the public names of the trainer)

# What `transformer-ln train` runs without a CONFIG: a small model on the built-in corpus, a few CPU minutes.
DEMO = {
    "model": {"d_model": 128, "n_heads": 4, "d_ff": 512, "n_enc_layers": 3, "n_dec_layers": 3, "dropout": 0.1,
              "share_embeddings": True, "max_positions": 256},
    "data": {"source": "synthetic", "vocab_size": 1000},
    "optim": {"lr": 2e-3, "warmup_updates": 300},
    "train": {"out_dir": "runs/demo", "max_tokens": 4096, "max_epochs": 30, "max_minutes": 4.0,
              "log_every": 20},
}


<<<<<<< HEAD
=======
@dataclass
class UpdateContext:
    """What a callback sees after each optimizer update."""

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
    bad_updates: int = 0
    status: str = "running"
    diverged_at: int | None = None
    extra: dict = field(default_factory=dict)


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


class Trainer:
    """Owns the accelerator, model, optimizer, data and the loop; ``run()`` returns the summary dict."""

    def __init__(self, cfg: RunConfig, cpu: bool = False, resume: bool = False, overwrite: bool = False,
                 callbacks: list | None = None, quiet: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.cfg, self.resume, self.quiet = cfg, resume, quiet
        cfg.train.require_stop()
        self.callbacks = list(callbacks or [])
        self.run_dir = Path(cfg.train.out_dir)
        device_hint = torch.device("cpu") if cpu or not torch.cuda.is_available() else torch.device("cuda")
        mp = resolve_mixed_precision(cfg.train.mixed_precision, device_hint)
        log_with = None
        if cfg.train.tensorboard:
            try:
                import tensorboard  # noqa: F401
                log_with = "tensorboard"
            except ImportError:
                print("warning: train.tensorboard=true but tensorboard is not installed; logging to "
                      "metrics.jsonl only", file=sys.stderr)
        self.accelerator = acc = Accelerator(cpu=cpu, mixed_precision=mp, log_with=log_with,
                                             project_dir=str(self.run_dir), step_scheduler_with_optimizer=False)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != acc.num_processes:
            raise UserError(
                f"the launcher started {world} processes but accelerate sees {acc.num_processes}: they would train "
                "as unsynchronised copies. On a machine without GPUs run `accelerate launch --multi_gpu "
                f"--num_processes {world} -m transformer_ln.train ... --cpu`; on GPUs check `accelerate config`.")
        self._prepare_run_dir(overwrite)
        set_seed(cfg.train.seed)

        from .data import prepare_data
        self.data = prepare_data(cfg, self.run_dir, acc, progress=not quiet)
        vocab = self.data.tokenizer.get_vocab_size()
        mcfg = cfg.model.to_dict()
        mcfg.update(src_vocab_size=vocab, tgt_vocab_size=vocab)
        self.cfg = cfg = RunConfig.from_dict({**cfg.to_dict(), "model": mcfg,
                                              "data": self.data.data_config.to_dict()})
        self._check_resume_config()
        if acc.is_main_process:
            cfg.save(self.run_dir / "config.yaml")

        self.model = Seq2SeqTransformer(cfg.model)
        self.pad_id = cfg.model.pad_id
        if not len(self.data.splits["train"]):
            raise UserError("the training split is empty after filtering; check the data paths and "
                            "model.max_positions")
        self.sampler = self.data.sampler("train", cfg.train.max_tokens, seed=cfg.train.seed, shuffle=True,
                                         num_shards=acc.num_processes, shard_id=acc.process_index)
        self.state = State()
        self._last_valid_update = -1
        self.optimizer = build_optimizer(self.model, cfg, acc.device)
        self.model = self.model.to(acc.device)
        if resume:
            self._load_last()
        else:
            self._calibrate()
        self.raw_model = self.model
        train_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.model, self.optimizer = acc.prepare(train_model, self.optimizer)
        if log_with and acc.is_main_process:
            acc.init_trackers("transformer_ln", config={"residual": cfg.model.residual})
        if cfg.train.grad_norms_every:
            from .diagnostics import GradNormCallback
            self.callbacks.append(GradNormCallback(cfg.train.grad_norms_every))

    # ---------------------------------------------------------------------------------------------- set-up

    RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "profile.json", "config.yaml", "tokenizer.json",
                 "cache", "eval_test.json", "eval_valid.json", "hyps_test.txt", "hyps_valid.txt")

    def _prepare_run_dir(self, overwrite: bool) -> None:
        """Resume needs checkpoints; a fresh run never appends to an earlier run's files."""
        acc = self.accelerator
        has_ckpts = bool(ckpt_lib.update_checkpoints(self.run_dir))
        if self.resume:
            if not has_ckpts:
                raise UserError(f"cannot resume: {self.run_dir} has no checkpoints (expected "
                                f"{ckpt_lib.checkpoints_dir(self.run_dir)}/update_*)")
        else:
            if (has_ckpts or (self.run_dir / "summary.json").exists()) and not overwrite:
                raise UserError(f"run directory {self.run_dir} already holds a run; continue it with "
                                f"`--resume {self.run_dir}`, start over with --overwrite, or set train.out_dir")
            if acc.is_main_process:  # an unfinished run without checkpoints has nothing to resume: start clean
                import shutil
                for name in self.RUN_FILES:
                    p = self.run_dir / name
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()

    def _check_resume_config(self) -> None:
        saved = self.run_dir / "config.yaml"
        if not self.resume or not saved.is_file():
            return
        old = RunConfig.load(saved)
        diff = [k for k, v in self.cfg.model.to_dict().items() if old.model.to_dict().get(k) != v]
        if diff:
            raise UserError(f"cannot resume {self.run_dir} with a different model config (changed: "
                            f"{', '.join('model.' + k for k in diff)}); drop those overrides or start a new run")

    def _load_last(self) -> None:
        last = ckpt_lib.update_checkpoints(self.run_dir)[-1]
        ckpt_lib.load_weights(self.model, last)
        ckpt_lib.load_optimizer_and_rng(self.optimizer, last, self.accelerator.process_index)
        try:
            saved = json.loads((last / "trainer_state.json").read_text())
            self.state = State(**saved)
        except (OSError, ValueError, TypeError) as e:
            raise UserError(f"checkpoint {last} has an unreadable trainer_state.json: {e}") from None
        self.state.status = "running"
        self.log(f"resumed from {last} at update {self.state.update}, epoch {self.state.epoch}")

    def _calibrate(self) -> None:
        """The scheme's data-dependent initialisation (Admin's profiling) on the first global batch.

        Every process builds the same batch from the same seed, so every process ends with the same omega.
        """
        whole = self.data.sampler("train", self.cfg.train.max_tokens, seed=self.cfg.train.seed, shuffle=True)
        whole.set_epoch(1)
        batch = self._to_device(self.data.batch("train", next(iter(whole))))
        profile = get_scheme(self.cfg.model.residual).calibrate(self.model, batch["src"], batch["tgt_in"],
                                                                seed=self.cfg.train.seed)
        if profile is None:
            return
        if self.accelerator.is_main_process:
            write_text(self.run_dir / "profile.json", json.dumps(profile, indent=1))
        self.log(f"Admin profile: encoder omega {profile['encoder'][0]:.3f} .. {profile['encoder'][-1]:.3f}, "
                 f"decoder {profile['decoder'][0]:.3f} .. {profile['decoder'][-1]:.3f}")

    # ---------------------------------------------------------------------------------------------- helpers

    def log(self, text: str) -> None:
        if self.accelerator.is_main_process and not self.quiet:
            from tqdm.auto import tqdm
            tqdm.write(text)

    def write_metrics(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.accelerator.trackers:
                step = record.get("update", self.state.update)
                self.accelerator.log({f"{record.get('kind', 'x')}/{k}": v for k, v in record.items()
                                      if isinstance(v, (int, float)) and k != "update"}, step=step)

    def _to_device(self, batch: dict) -> dict:
        dev = self.accelerator.device
        pin = dev.type == "cuda"
        return {k: (v.pin_memory().to(dev, non_blocking=True) if pin else v.to(dev))
                if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _batches_of_epoch(self, epoch: int) -> list[list[int]]:
        """This process's batches for the epoch, padded with ``None`` so every process has the same count."""
        self.sampler.set_epoch(epoch)
        mine: list = list(self.sampler)
        per_shard = getattr(self.sampler, "batches_per_shard", len(mine))
        return mine + [None] * (per_shard - len(mine))

    # ---------------------------------------------------------------------------------------------- loop

    def train_update(self, group: list[dict | None]) -> dict[str, float]:
        """One optimizer update over ``update_freq`` micro-batches; returns the global loss, nll and grad norm.

        Each micro-batch's summed loss is scaled by world / (global target tokens) so that, after DDP averages the
        gradients over processes, the gradient is that of sum(loss) / sum(tokens) over everything in the update.
        A ``None`` micro-batch (this process ran out of batches) repeats a real one with weight 0.
        """
        acc, cfg = self.accelerator, self.cfg
        real = [b for b in group if b is not None]
        local_tokens = sum(b["ntokens"] for b in real)
        counts = acc.reduce(torch.tensor([float(local_tokens)], device=acc.device), reduction="sum")
        scale = acc.num_processes / counts.clamp(min=1.0)
        loss_acc = torch.zeros((), device=acc.device)
        nll_acc = torch.zeros((), device=acc.device)
        filler = real[0] if real else None
        for j, b in enumerate(group):
            weight = 1.0 if b is not None else 0.0
            b = b if b is not None else filler
            if b is None:  # a process with no batch at all in this update: contributes zero gradient
                b = self._empty_batch()
            sync = j == len(group) - 1
            ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
            with ctx:
                with acc.autocast():
                    loss, nll = compute_loss(self.model, b, cfg.optim.label_smoothing, self.pad_id)
                acc.backward(loss * (weight * scale[0]))
            loss_acc = loss_acc + loss.detach() * weight
            nll_acc = nll_acc + nll.detach() * weight
        clip = cfg.optim.clip_norm if cfg.optim.clip_norm > 0 else float("inf")
        gnorm = acc.clip_grad_norm_(self.model.parameters(), clip)
        sums = acc.reduce(torch.stack([loss_acc, nll_acc]), reduction="sum")
        gnorm = torch.as_tensor(gnorm, device=acc.device, dtype=torch.float32).reshape(())
        omega = omega_summary(self.raw_model)  # Admin's omega before this update; None for other schemes
        parts = [sums / counts, gnorm[None], counts] + ([omega] if omega is not None else [])
        stats = torch.cat(parts).tolist()  # the one host sync of an update
        loss_v, nll_v, gnorm_v, tokens = stats[:4]
        out = {"loss": loss_v / math.log(2), "nll": nll_v / math.log(2), "grad_norm": gnorm_v, "ntokens": int(tokens)}
        if omega is not None:
            out.update(omega_min=stats[4], omega_mean=stats[5], omega_max=stats[6])
        return out

    def _empty_batch(self) -> dict:
        one = torch.full((1, 2), 4, dtype=torch.long)
        return self._to_device({"src": one, "tgt_in": one, "tgt_out": one, "ntokens": 0})

    def _set_lr(self) -> float:
        o = self.cfg.optim
        lr = inverse_sqrt_lr(self.state.update, o.lr, o.warmup_updates, o.warmup_init_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cfg, acc, st = self.cfg, self.accelerator, self.state
        t_cfg = cfg.train
        deadline = time.time() + t_cfg.max_minutes * 60 if t_cfg.max_minutes else None
        start_wall = time.time() - st.wall_time
        bar = tqdm(total=t_cfg.max_updates or None, initial=st.update, disable=not acc.is_main_process or self.quiet,
                   desc=f"{cfg.model.residual} {cfg.model.n_enc_layers}L-{cfg.model.n_dec_layers}L", unit="upd",
                   dynamic_ncols=True)
        stop = False
        last_saved_update = st.update if self.resume else -1
        while not stop and (t_cfg.max_epochs == 0 or st.epoch <= t_cfg.max_epochs):
            batches = self._batches_of_epoch(st.epoch)
            pos = st.batches_in_epoch
            while pos < len(batches) and not stop:
                group_idx = batches[pos:pos + t_cfg.update_freq]
                group = [None if ix is None else self._to_device(self.data.batch("train", ix)) for ix in group_idx]
                lr = self._set_lr()
                t0 = time.time()
                self.model.train()
                stats = self.train_update(group)
                pos += len(group_idx)
                st.batches_in_epoch = pos
                bad = not math.isfinite(stats["loss"]) or stats["loss"] > t_cfg.diverge_loss
                if bad:
                    self.optimizer.zero_grad(set_to_none=True)
                    st.bad_updates += 1
                    self.write_metrics({"kind": "skipped", "update": st.update + 1, "epoch": st.epoch,
                                        "loss": stats["loss"] if math.isfinite(stats["loss"]) else None,
                                        "bad_in_a_row": st.bad_updates})
                    self.log(f"update {st.update + 1}: loss {stats['loss']:.3g} is non-finite or above "
                             f"train.diverge_loss={t_cfg.diverge_loss}; skipped ({st.bad_updates}/"
                             f"{t_cfg.diverge_patience})")
                    if st.bad_updates >= t_cfg.diverge_patience:
                        st.status, st.diverged_at = "diverged", st.update + 1
                        stop = True
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                st.bad_updates = 0
                st.update += 1
                st.tokens += stats["ntokens"]
                dt = max(time.time() - t0, 1e-9)
                record = {"kind": "train", "update": st.update, "epoch": st.epoch, "loss": stats["loss"],
                          "nll": stats["nll"], "lr": lr, "grad_norm": stats["grad_norm"],
                          "tokens_per_s": stats["ntokens"] / dt, "ntokens": stats["ntokens"]}
                record.update({k: v for k, v in stats.items() if k.startswith("omega_")})
                self.write_metrics(record)
                bar.update(1)
                if st.update % t_cfg.log_every == 0 or st.update == 1:
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{lr:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                for cb in self.callbacks:
                    cb.on_update_end(UpdateContext(st.update, self.raw_model, group[0] or self._empty_batch(),
                                                   self.write_metrics))
                st.wall_time = time.time() - start_wall
                if t_cfg.valid_every and st.update % t_cfg.valid_every == 0:
                    self.validate()
                if t_cfg.save_every and st.update % t_cfg.save_every == 0:
                    self.save()
                    last_saved_update = st.update
                if t_cfg.max_updates and st.update >= t_cfg.max_updates:
                    stop = True
                if deadline and time.time() > deadline:
                    self.log(f"train.max_minutes={t_cfg.max_minutes} reached at update {st.update}")
                    stop = True
            if pos >= len(batches):  # finished the epoch
                st.epoch += 1
                st.batches_in_epoch = 0
                if st.status != "diverged":
                    if self._last_valid_update != st.update:
                        self.validate()
                    if t_cfg.save_epochs:
                        self.save()
                        last_saved_update = st.update
        bar.close()
        st.wall_time = time.time() - start_wall
        if st.status != "diverged":
            st.status = "completed"
            if self._last_valid_update != st.update:
                self.validate()
            if last_saved_update != st.update:
                self.save()
        summary = self.summary()
        if acc.is_main_process:
            write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        if acc.trackers:
            acc.end_training()
        return summary

    @torch.no_grad()
    def validate(self) -> dict | None:
        """Validation loss, nll and perplexity over the whole valid split (sharded over processes)."""
        if not len(self.data.splits.get("valid") or ()):
            return None
        acc, st = self.accelerator, self.state
        self._last_valid_update = st.update
        sampler = self.data.sampler("valid", self.cfg.train.max_tokens, seed=0, shuffle=False,
                                    num_shards=acc.num_processes, shard_id=acc.process_index)
        self.raw_model.eval()
        sums = torch.zeros(3, device=acc.device)
        for ix in sampler:
            b = self._to_device(self.data.batch("valid", ix))
            with acc.autocast():
                loss, nll = compute_loss(self.raw_model, b, self.cfg.optim.label_smoothing, self.pad_id)
            sums += torch.stack([loss.float(), nll.float(), torch.tensor(float(b["ntokens"]), device=acc.device)])
        sums = acc.reduce(sums, reduction="sum").tolist()
        loss = sums[0] / max(sums[2], 1) / math.log(2)
        nll = sums[1] / max(sums[2], 1) / math.log(2)
        rec = {"kind": "valid", "update": st.update, "epoch": st.epoch, "loss": loss, "nll": nll,
               "ppl": 2 ** min(nll, 1000.0)}
        self.write_metrics(rec)
        self.log(f"valid @ update {st.update}: loss {loss:.3f}  nll {nll:.3f}  ppl {rec['ppl']:.2f}")
        if math.isfinite(loss) and (st.best_valid_loss is None or loss < st.best_valid_loss):
            st.best_valid_loss, st.best_valid_nll = loss, nll
            st.extra["best_pending"] = True
        return rec

    def save(self) -> None:
        st = self.state
        if st.update == 0:
            return
        state = dict(st.__dict__)
        state["extra"] = {k: v for k, v in st.extra.items() if k != "best_pending"}
        path = ckpt_lib.save_checkpoint(self.run_dir, st.update, self.raw_model, self.optimizer, self.cfg, state,
                                        self.accelerator)
        if self.accelerator.is_main_process:
            if st.extra.pop("best_pending", False) or not (ckpt_lib.checkpoints_dir(self.run_dir) / "best").is_dir():
                ckpt_lib.copy_as(path, "best")
            ckpt_lib.prune_checkpoints(self.run_dir, self.cfg.train.keep_last)
        self.accelerator.wait_for_everyone()

    def summary(self) -> dict[str, Any]:
        st, m = self.state, self.cfg.model
        return {"status": st.status, "diverged_at": st.diverged_at, "best_valid_loss": st.best_valid_loss,
                "best_valid_nll": st.best_valid_nll, "updates": st.update, "epochs_started": st.epoch,
                "tokens": st.tokens, "wall_time_s": round(st.wall_time, 2), "residual": m.residual,
                "n_enc_layers": m.n_enc_layers, "n_dec_layers": m.n_dec_layers, "lr": self.cfg.optim.lr,
                "warmup_updates": self.cfg.optim.warmup_updates, "seed": self.cfg.train.seed,
                "processes": self.accelerator.num_processes}


# -------------------------------------------------------------------------------------------------- CLI


>>>>>>> bcfbac9 (data: memory-mapped prepared directories replace Python lists; batches gathered per step from Arrow)
def parse_args(argv: list[str]) -> argparse.Namespace:
    from .cli import Parser, add_config_arguments

    p = Parser(
        prog="transformer-ln train",
        description="Train a Post-LN, Pre-LN or Admin encoder-decoder. Without CONFIG: a small model on the "
                    "built-in synthetic corpus (a few CPU minutes). Settings are `section.key=value` overrides; "
                    "options may come anywhere.",
        epilog="examples:\n  transformer-ln train --cpu\n"
               "  transformer-ln train experiments/configs/cpu_synthetic.yaml model.residual=admin "
               "model.n_enc_layers=12\n  transformer-ln train --resume runs/demo train.max_updates=2000\n"
               "  accelerate launch -m transformer_ln.train CONFIG.yaml model.residual=pre_ln",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run in train.out_dir first")
    return p.parse_intermixed_args(argv)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    from .cli import config_from_arguments

    if args.resume:
        run = RunDir(args.resume)
        if not run.path.is_dir():
            raise UserError(f"cannot resume: run directory {run} does not exist")
        if not run.config.is_file():
            raise UserError(f"cannot resume: {run.config} is missing, so {run} is not a run directory")
        return config_from_arguments(list(args.args) + [f"train.out_dir={run}"], resume_dir=run.path)
    return config_from_arguments(args.args, defaults=DEMO)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    trainer = Trainer(cfg, cpu=args.cpu, resume=bool(args.resume), overwrite=args.overwrite)
    summary = trainer.run()
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
    done_before = trainer.finished and trainer.rundir.eval_file("test").is_file()
    if summary["status"] == "completed" and cfg.train.bleu_at_end and not done_before:
        from .evaluate import evaluate_run
        evaluate_run(trainer.run_dir, split="test", checkpoint="best", accelerator=trainer.accelerator,
                     model=None)
    return 0


if __name__ == "__main__":
    from .cli import run_command

    sys.exit(run_command(main, sys.argv[1:]))
