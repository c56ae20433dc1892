"""Run a grid of training runs (residual x depth x lr x warmup x seed) and collect the paper's comparison table.

Each run is a separate ``transformer_ln.train`` process (optionally under ``accelerate launch``) writing into
``<out>/<name>/``; a run whose ``summary.json`` exists is finished and skipped, one with a checkpoint is resumed
(``--resume``, bit-exact), so a sweep can be rerun or resumed.
``collect`` reads every run's ``summary.json`` and test evaluation (``eval_test_best.json``) into ``results.csv``
and ``results.md``, with the update whose weights were scored: a resumed run whose ``best`` moved on since its
evaluation says so (``38 (best: 99)``) instead of passing an old score off as the new model's.
``main`` is ``transformer-ln sweep`` (``experiments/sweep.py`` calls it too).
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from ..errors import UserError
from ..runs.rundir import RunDir

AXES = ("residual", "depth", "lr", "warmup", "seed")
COLUMNS = ["run", "residual", "depth", "lr", "warmup", "seed", "status", "diverged_at", "best_valid_loss",
           "best_valid_nll", "test_bleu", "bleu_update", "bleu_weights_sha256", "best_update", "updates",
           "wall_time_s"]


@dataclass(frozen=True)
class Point:
    residual: str
    depth: int
    lr: float
    warmup: int
    seed: int
    options: tuple[str, ...] = ()  # this point's own overrides (section.key=value), e.g. a scheme's option

    @property
    def scheme(self) -> str:
        """The residual scheme and its options, as run names show them: ``pre_ln+qk_norm``, ``pre_ln+z_loss0.0001``."""
        tags = [(lambda k, v: k.rsplit(".", 1)[-1] + ("" if v.lower() == "true" else v))(*o.split("=", 1))
                for o in self.options]
        return "+".join([self.residual, *tags])

    @property
    def name(self) -> str:
        return f"{self.scheme}-{self.depth}L-lr{self.lr:g}-w{self.warmup}-s{self.seed}"

    def overrides(self) -> list[str]:
        return [f"model.residual={self.residual}", f"model.n_enc_layers={self.depth}",
                f"model.n_dec_layers={self.depth}", f"optim.lr={self.lr!r}", f"optim.warmup_updates={self.warmup}",
                f"train.seed={self.seed}", *self.options]


def parse_grid(items: list[str], defaults: dict[str, list] | None = None) -> list[Point]:
    """``["residual=post_ln,admin", "depth=6,18", "lr=1e-3"]`` -> the cross product (unset axes from defaults)."""
    axes: dict[str, list] = dict(defaults or {})
    cast = {"residual": str, "depth": int, "lr": float, "warmup": int, "seed": int}
    for item in items:
        key, _, values = item.partition("=")
        if key not in cast or not values:
            raise UserError(f"grid axis {item!r}: write AXIS=v1,v2 with AXIS one of {', '.join(AXES)}")
        try:
            axes[key] = [cast[key](v) for v in values.split(",")]
        except ValueError:
            raise UserError(f"grid axis {key}: cannot read {values!r} as {cast[key].__name__} values") from None
    missing = [a for a in AXES if a not in axes]
    if missing:
        raise UserError(f"the grid needs values for {', '.join(missing)} (e.g. --grid {missing[0]}=...)")
    return [Point(*combo) for combo in itertools.product(*(axes[a] for a in AXES))]


def is_finished(run_dir: Path) -> bool:
    return RunDir(run_dir).summary.is_file()


def train_command(config: str | None, point: Point, run_dir: Path, overrides: list[str], cpu: bool,
                  launcher: list[str] | None) -> list[str]:
    head = [*launcher, "-m", "transformer_ln.train"] if launcher else [sys.executable, "-m", "transformer_ln.train"]
    run = RunDir(run_dir)
    if run.has_checkpoints() and run.config.is_file():  # interrupted: go on exactly where it stopped
        args = ["--resume", str(run_dir)] + list(overrides) + point.overrides()
    else:
        args = ([config] if config else []) + list(overrides) + point.overrides() + [f"train.out_dir={run_dir}"]
        if run.is_run():
            args.append("--overwrite")  # started, no checkpoint yet: restart (only its own files are deleted)
    return head + args + (["--cpu"] if cpu else [])


def run_grid(points: list[Point], out: Path, config: str | None = None, overrides: list[str] = (),
             cpu: bool = False, launcher: list[str] | None = None, log=print) -> list[Path]:
    """Train every point not finished yet, one after another; returns the run directories."""
    out.mkdir(parents=True, exist_ok=True)
    dirs = []
    for k, point in enumerate(points, 1):
        run_dir = out / point.name
        dirs.append(run_dir)
        if is_finished(run_dir):
            log(f"[{k}/{len(points)}] {point.name}: finished, skipped")
            continue
        cmd = train_command(config, point, run_dir, list(overrides), cpu, launcher)
        log(f"[{k}/{len(points)}] {point.name}: {' '.join(cmd[1:])}")
        t0 = time.time()
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(out / f"{point.name}.log", "w") as logf:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ})
        if proc.returncode != 0:
            log(f"  failed with exit code {proc.returncode}; see {out / (point.name + '.log')}")
        else:
            s = RunDir(run_dir).read_summary()
            log(f"  {s.status} after {s.updates} updates, best valid loss {s.best_valid_loss}, "
                f"{time.time() - t0:.0f} s")
    return dirs


def collect(out: Path) -> list[dict]:
    """One row per run directory under ``out`` holding a summary.json; writes results.csv and results.md."""
    rows = []
    for run_dir in sorted(p for p in out.iterdir() if p.is_dir() and is_finished(p)):
        run = RunDir(run_dir)
        s = run.read_summary()
        ev = run.find_eval("test")
        ev = json.loads(ev.read_text()) if ev is not None else {}
        best = re.search(r"\(update (\d+)\)", s.best_checkpoint or "")
        rows.append({"run": run_dir.name, "residual": s.residual, "depth": s.n_enc_layers, "lr": s.lr,
                     "warmup": s.warmup_updates, "seed": s.seed, "status": s.status, "diverged_at": s.diverged_at,
                     "best_valid_loss": s.best_valid_loss, "best_valid_nll": s.best_valid_nll,
                     "test_bleu": ev.get("bleu"), "bleu_update": ev.get("update"),
                     "bleu_weights_sha256": ev.get("weights_sha256"), "best_update": int(best[1]) if best else None,
                     "updates": s.updates, "wall_time_s": s.wall_time_s})
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text(out / "results.csv", table.getvalue())
    write_text(out / "results.md", markdown_table(rows))
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.2f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    head = ["scheme", "depth", "lr", "warmup", "seed", "status", "best valid nll", "test BLEU", "BLEU of update",
            "weights sha256", "updates", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        status = r["status"] + (f" @{r['diverged_at']}" if r["diverged_at"] else "")
        at = r.get("bleu_update")  # older evaluations did not record it: "?" rather than a guess
        at = "?" if r["test_bleu"] is not None and at is None else at
        if at is not None and r.get("best_update") is not None and at != r["best_update"]:
            at = f"{at} (best: {r['best_update']})"  # scored before a resume moved best on: re-evaluate
        cells = [r["residual"], r["depth"], r["lr"], r["warmup"], r["seed"], status, r["best_valid_nll"],
                 r["test_bleu"], at, (r.get("bleu_weights_sha256") or "")[:12] or None, r["updates"],
                 r["wall_time_s"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(out: Path, run_dirs: list[Path]) -> list[Path]:
    """Overlaid training curves of all finished runs, and the dependency heatmaps of each completed model.

    The dependency is measured on a seeded random token batch with the run's best checkpoint (eval mode).
    """
    from ..runs.checkpoint import load_model
    from ..diagnostics import residual_dependency
    from ..diagnostics.batch import batch_inputs, random_batch_for
    from ..diagnostics.plotting import plot_curves, plot_dependency

    finished = [d for d in run_dirs if is_finished(d)]
    made = list(plot_curves(finished, out / "curves")) if finished else []
    for d in finished:
        if RunDir(d).read_summary().status != "completed":
            continue
        model, _ = load_model(d, RunDir.BEST)
        inputs, _ = batch_inputs(random_batch_for(model, batch_size=8, seq_len=20))  # either architecture
        betas = residual_dependency(model, *inputs)
        made += plot_dependency({d.name: betas}, out / f"dependency_{d.name}", checkpoint=RunDir.BEST)
    return made


def main(argv: list[str]) -> int:
    """``transformer-ln sweep``: train every grid point not finished yet, collect results.md/.csv, plot."""
    from ..config.parser import Parser
    from ..model.schemes import SCHEMES

    p = Parser(prog="transformer-ln sweep", description="Run a grid of training runs (one run directory per point, "
               "finished ones skipped, interrupted ones resumed) and collect OUT/results.md and results.csv "
               "(scores with the update they were measured on) and the plots. Overrides for every run follow --.")
    p.add_argument("config", nargs="?", help="base YAML config (default: the built-in demo settings)")
    p.add_argument("--out", required=True, help="sweep folder: one run directory per grid point")
    p.add_argument("--grid", nargs="+", default=[], metavar="AXIS=V1,V2",
                   help="axes residual, depth, lr, warmup, seed (defaults: every registered scheme, 3, 2e-3, 300, 1)")
    p.add_argument("--launcher", default=None, help='e.g. "accelerate launch --num_processes 2" (default: python)')
    p.add_argument("--cpu", action="store_true", help="pass --cpu to every run")
    p.add_argument("--no-plots", action="store_true", help="skip the curve and dependency plots")
    args, rest = p.parse_known_args(argv)
    overrides = [r for r in rest if r != "--"]  # section.key=value for every run, after --
    bad = [r for r in overrides if "=" not in r]
    if bad:
        raise UserError(f"transformer-ln sweep: unrecognized arguments: {' '.join(bad)} (overrides look like "
                        "section.key=value, after --)")
    defaults = {"residual": list(SCHEMES), "depth": [3], "lr": [2e-3], "warmup": [300], "seed": [1]}
    points = parse_grid(args.grid, defaults)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the sweep's run directories")
    dirs = run_grid(points, out, args.config, overrides, args.cpu,
                    shlex.split(args.launcher) if args.launcher else None)
    rows = collect(out)
    print((out / "results.md").read_text())
    if not args.no_plots and rows:
        for path in plot_sweep(out, dirs):
            print(f"wrote {path}")
    return 0
