"""The learning-rate-sensitivity sweep (Wortsman et al. 2023, arXiv 2309.14322): schemes x depths x a log grid of
learning rates x seeds, each point one ``transformer_ln.train`` run of ``sweep.run_grid`` (finished runs skipped,
interrupted ones resumed; ``jobs`` points at a time), then one row per run and one LR-sensitivity number per
scheme, depth and seed.

LR sensitivity as implemented here (the paper's section was not checked, see ../shared/reference/variants-2025.md
8a): LRS = mean over the LR grid of min(l(lr), l0) - min over the grid of l(lr), with l(lr) the run's final
validation loss (bits per token), l0 the loss at initialisation (the first update's training loss, computed with the
initial weights) and a run that diverged or ended with a non-finite loss counted as l0. Lower is less sensitive; 0
means every LR reached the same loss. With no run below l0 the number is undefined (NaN).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean

from ..atomic import write_text
from ..errors import UserError
from ..runs.rundir import RunDir
from .sweep import Point, is_finished, run_grid

# scheme options written after the scheme name: ``pre_ln+qk_norm``, ``pre_ln+z_loss`` or ``pre_ln+z_loss=1e-5``
OPTIONS = {"qk_norm": ("model.qk_norm", "true"), "z_loss": ("optim.z_loss", "1e-4")}  # 1e-4: PaLM's coefficient
COLUMNS = ["run", "scheme", "depth", "lr", "seed", "status", "diverged_at", "updates", "l0", "final_loss",
           "capped_loss", "wall_time_s"]


def parse_scheme(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"pre_ln+qk_norm+z_loss=1e-5"`` -> ``("pre_ln", ("model.qk_norm=true", "optim.z_loss=1e-5"))``; an option
    may also be any ``section.key=value``."""
    residual, *opts = spec.split("+")
    out = []
    for o in opts:
        key, eq, value = o.partition("=")
        if "." in key and eq:
            out.append(o)
        elif key in OPTIONS:
            out.append(f"{OPTIONS[key][0]}={value if eq else OPTIONS[key][1]}")
        else:
            raise UserError(f"scheme {spec!r}: option {o!r} is not one of {', '.join(OPTIONS)} "
                            "(or write section.key=value, e.g. pre_ln+model.qk_norm=true)")
    if not residual:
        raise UserError(f"scheme {spec!r}: name the residual scheme first, e.g. pre_ln+qk_norm")
    return residual, tuple(out)


def lr_points(schemes: list[str], depths: list[int], lrs: list[float], seeds: list[int], warmup: int) -> list[Point]:
    """The grid, cheapest first (depth, then seed, then scheme, then learning rate)."""
    bad = [lr for lr in lrs if not (math.isfinite(lr) and lr > 0)]
    if bad:
        raise UserError(f"learning rates: got {bad}; each must be a positive finite number")
    parsed = [parse_scheme(s) for s in schemes]
    return [Point(res, d, lr, warmup, seed, opts) for d in depths for seed in seeds for res, opts in parsed
            for lr in lrs]


def check_points(points: list[Point], config: str | None, overrides: list[str]) -> None:
    """Build every point's run config before training anything: a bad scheme or option is one line, at once."""
    from ..config.run_config import load_run_config

    for p in points:
        load_run_config(config, [*overrides, *p.overrides(), "train.out_dir=unused"])


def run_lr_sweep(points: list[Point], out: Path, config: str | None = None, overrides: list[str] = (),
                 jobs: int = 1, cpu: bool = False, log=print) -> list[Path]:
    """Train every unfinished point, ``jobs`` at a time (each its own process); returns the run directories.

    Two sweeps on the same folder are safe too: a run is skipped once finished and refused while another process
    holds it (the trainer's run marker)."""
    out.mkdir(parents=True, exist_ok=True)
    if jobs > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per run
    work = lambda p: run_grid([p], out, config, list(overrides), cpu, log=log)[0]  # noqa: E731
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(work, points))


def _records(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return rows


def run_row(point: Point, run_dir: Path) -> dict:
    """One finished run: status, l0 (first update's loss), final validation loss, capped loss (bits/token)."""
    s = RunDir(run_dir).read_summary()
    recs = _records(run_dir)
    train = [r for r in recs if r.get("kind") == "train" and r.get("update") == 1]
    valid = [r for r in recs if r.get("kind") == "valid"]
    l0 = train[0]["loss"] if train else None
    final = valid[-1]["loss"] if valid and s.status == "completed" else None
    if final is not None and not math.isfinite(final):
        final = None
    capped = None if l0 is None else (l0 if final is None else min(final, l0))
    return {"run": run_dir.name, "scheme": point.scheme, "depth": point.depth, "lr": point.lr, "seed": point.seed,
            "status": s.status, "diverged_at": s.diverged_at, "updates": s.updates, "l0": l0, "final_loss": final,
            "capped_loss": capped, "wall_time_s": s.wall_time_s}


def lr_sensitivity(losses: list[float | None], l0: float) -> float:
    """Wortsman et al.'s LRS over one grid (module docstring): None or non-finite losses count as l0."""
    capped = [l0 if (x is None or not math.isfinite(x)) else min(x, l0) for x in losses]
    if not capped or min(capped) >= l0:
        return math.nan
    return mean(capped) - min(capped)


def sensitivity_table(rows: list[dict], expected: dict[tuple, int] | None = None) -> list[dict]:
    """One row per (scheme, depth, seed): LRS, best LR, its loss, l0, runs diverged; the LRS is NaN where fewer
    runs finished than ``expected[(scheme, depth, seed)]`` (an interrupted sweep: the grid is incomplete)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["scheme"], r["depth"], r["seed"]), []).append(r)
    out = []
    for (scheme, depth, seed), rs in groups.items():
        l0s = [r["l0"] for r in rs if r["l0"] is not None]
        if not l0s:
            continue
        l0 = mean(l0s)
        losses = [r["final_loss"] for r in rs]
        finite = [(x, r["lr"]) for x, r in zip(losses, rs) if x is not None and math.isfinite(x)]
        best = min(finite) if finite else (None, None)
        complete = expected is None or len(rs) >= expected.get((scheme, depth, seed), 0)
        out.append({"scheme": scheme, "depth": depth, "seed": seed,
                    "lrs": lr_sensitivity(losses, l0) if complete else math.nan, "l0": l0,
                    "best_loss": best[0], "best_lr": best[1], "n_lr": len(rs),
                    "diverged": sum(r["status"] == "diverged" for r in rs)})
    return out


def collect_lr(points: list[Point], out: Path, dest: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Rows of the finished points and the LRS table; writes ``lr_results.csv``/``.md`` and ``lrs.csv``/``.md``
    into ``dest`` (default ``out``)."""
    dest = Path(dest or out)
    dest.mkdir(parents=True, exist_ok=True)
    rows = [run_row(p, out / p.name) for p in points if is_finished(out / p.name)]
    expected: dict[tuple, int] = {}
    for p in points:
        expected[(p.scheme, p.depth, p.seed)] = expected.get((p.scheme, p.depth, p.seed), 0) + 1
    sens = sensitivity_table(rows, expected)
    write_text(dest / "lr_results.csv", _csv(rows, COLUMNS))
    write_text(dest / "lr_results.md", _markdown(rows, COLUMNS))
    sens_cols = ["scheme", "depth", "seed", "lrs", "best_lr", "best_loss", "l0", "n_lr", "diverged"]
    write_text(dest / "lrs.csv", _csv(sens, sens_cols))
    write_text(dest / "lrs.md", _markdown(sens, sens_cols))
    return rows, sens


def _csv(rows: list[dict], columns: list[str]) -> str:
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return table.getvalue()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1e-2 else f"{v:.3f}"
    return str(v)


def _markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
