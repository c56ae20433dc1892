"""The feed-forward study of Ba et al.'s batch-size claims: the grid of runs, the learning-rate rule, the table and
the figures (models and training loop in ``feedforward``).

Protocol, the same for every row (model x norm x batch size): Adam at a constant learning rate, a fixed number of
updates; the learning rate is the grid value with the lowest final validation error (ties: validation nll) of one
tuning seed, and the rows are then reported over other seeds (mean ± sd in tables, mean and min-max band in
figures, as in ``study``). Each run is one JSON file under ``runs_dir``; a run whose file exists is read, not redone.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Iterable, Optional

from ..atomic import write_text
from .feedforward import MODEL_NORMS, FFConfig, Split, load_digits_split, train_ff
from .study import NORM_COLORS, _axes_labels, _save_png, write_csv

BATCH_SIZES = (4, 16, 64, 256)
LRS = (3e-4, 1e-3, 3e-3)
SEEDS = (1, 2, 3)
TUNE_SEED = 0
COLORS = {"none": NORM_COLORS[None], "batchnorm": NORM_COLORS["batchnorm"], "layernorm": NORM_COLORS["layernorm"],
          "rmsnorm": "tab:green", "groupnorm": "tab:purple"}
TITLES = {"mlp": "PI-MLP", "cnn": "CNN"}  # PI: permutation-invariant


def run_name(model: str, norm: str, batch_size: int, lr: float, seed: int) -> str:
    return f"{model}-{norm}-b{batch_size}-lr{lr:g}-s{seed}"


def _path(cfg: FFConfig, runs_dir: Path) -> Path:
    return Path(runs_dir) / (run_name(cfg.model, cfg.norm, cfg.batch_size, cfg.lr, cfg.seed) + ".json")


def read_run(cfg: FFConfig, runs_dir: str | Path) -> Optional[dict]:
    """The run's summary from ``runs_dir/<name>.json``, None if absent or of another config."""
    path = _path(cfg, Path(runs_dir))
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary["config"] == cfg.to_dict():
            return summary
    return None


def run_or_read(cfg: FFConfig, runs_dir: str | Path, data: Split) -> dict:
    """The run's summary: read when its file exists, else trained and written there."""
    summary = read_run(cfg, runs_dir)
    if summary is None:
        summary = train_ff(cfg, data)
        path = _path(cfg, Path(runs_dir))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(summary, separators=(",", ":")))
    return summary


def _rank(run: dict) -> tuple[float, float]:
    if run["status"] != "completed":
        return (math.inf, math.inf)
    nll = run["final_valid_nll"]
    return (run["final_valid_err"], nll if math.isfinite(nll) else math.inf)


def choose_lr(tuning: list[dict]) -> float:
    """The learning rate of the tuning run with the lowest final validation error, then validation nll."""
    return min(tuning, key=_rank)["config"]["lr"]


_DATA: Optional[Split] = None


def _digits() -> Split:
    """The digit split, loaded once per process."""
    global _DATA
    if _DATA is None:
        _DATA = load_digits_split()
    return _DATA


def _run(job: tuple[dict, str]) -> dict:
    """One run in a worker process (one thread): module-level, so that the process pool can pickle it."""
    import torch

    torch.set_num_threads(1)
    return run_or_read(FFConfig(**job[0]), Path(job[1]), _digits())


def _run_all(jobs: list[dict], runs_dir: Path, workers: int, bar) -> list[dict]:
    done = [read_run(FFConfig(**cfg), runs_dir) for cfg in jobs]
    todo = [(cfg, str(runs_dir)) for cfg, s in zip(jobs, done) if s is None]
    if bar is not None:
        bar.update(len(jobs) - len(todo))
    if workers <= 1 or len(todo) <= 1:
        results = map(_run, todo)
        pool = None
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        results = pool.map(_run, todo)
    fresh = iter(results)
    out = []
    try:
        for s in done:
            if s is not None:
                out.append(s)
                continue
            s = next(fresh)
            out.append(s)
            if bar is not None:
                c = s["config"]
                bar.set_postfix_str(f"{c['model']} {c['norm']} b{c['batch_size']} lr {c['lr']:g} s{c['seed']}",
                                    refresh=False)
                bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def run_study(runs_dir: str | Path, models: Iterable[str] = ("mlp", "cnn"),
              batch_sizes: Iterable[int] = BATCH_SIZES, lrs: Iterable[float] = LRS, seeds: Iterable[int] = SEEDS,
              tune_seed: int = TUNE_SEED, updates: int = 600, eval_every: int = 30, workers: int = 1,
              progress: bool = True, **model_kw) -> tuple[list[dict], list[dict]]:
    """(reported runs, tuning runs) of every model x norm x batch size, ``workers`` runs at a time (processes of
    one thread each): first the learning-rate grid on ``tune_seed`` (none with one learning rate), then the chosen
    rate of each row on ``seeds``. Every config is checked before anything runs."""
    rows = [(m, n, b) for m in models for n in MODEL_NORMS[m] for b in batch_sizes]
    lrs, seeds, runs_dir = list(lrs), list(seeds), Path(runs_dir)
    tune = len(lrs) > 1

    def cfg(model, norm, b, lr, seed) -> dict:
        return FFConfig(model=model, norm=norm, batch_size=b, lr=lr, seed=seed, updates=updates,
                        eval_every=eval_every, **model_kw).to_dict()
    for model, norm, b in rows:  # a bad value fails here, in one line, before any run
        cfg(model, norm, b, lrs[0], seeds[0])
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(rows) * (len(seeds) + (len(lrs) if tune else 0)), desc="feed-forward study", unit="run")
    try:
        tuning = _run_all([cfg(*row, lr, tune_seed) for row in rows for lr in lrs], runs_dir, workers, bar) \
            if tune else []
        chosen = {row: choose_lr(tuning[i * len(lrs):(i + 1) * len(lrs)]) if tune else lrs[0]
                  for i, row in enumerate(rows)}
        reported = _run_all([cfg(*row, chosen[row], s) for row in rows for s in seeds], runs_dir, workers, bar)
    finally:
        if bar is not None:
            bar.close()
    return reported, tuning


# ---- tables ----

def _groups(runs: Iterable[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        c = r["config"]
        out.setdefault((c["model"], c["norm"], c["batch_size"]), []).append(r)
    order = {n: i for i, n in enumerate(("none", "batchnorm", "layernorm", "rmsnorm", "groupnorm"))}
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0] != "mlp", kv[0][2], order[kv[0][1]])))


def _at(run: dict, update: int, key: str) -> Optional[float]:
    return next((row[key] for row in run["history"] if row["update"] == update), None)


def _ms(xs: list[Optional[float]], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    xs = [x * scale for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.replace('+', '').format(statistics.stdev(xs))}"


def early_update(runs: list[dict]) -> int:
    """The evaluated update nearest a tenth of the budget: where "converges faster" shows."""
    ups = sorted({row["update"] for r in runs for row in r["history"]} - {0})
    return min(ups, key=lambda u: abs(u - ups[-1] / 10))


def results_table(reported: list[dict]) -> tuple[str, list[dict]]:
    """Markdown (mean ± sd over seeds; errors in %) and CSV rows (one per run)."""
    early = early_update(reported)
    head = ["model", "norm", "batch", "lr", "seeds", f"test err @ {early}", "test err, final",
            "test nll, final", "train nll, final", "test err, batch stats", "batch − running stats"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|" + "---:|" * (len(head) - 5)]
    rows = []
    for (model, norm, b), rs in _groups(reported).items():
        lrs = sorted({r["config"]["lr"] for r in rs})
        gap = [r["test_err_batch_stats"] - r["final_test_err"] for r in rs]
        lines.append("| " + " | ".join([
            model, norm, str(b), ", ".join(f"{x:g}" for x in lrs), str(len(rs)),
            _ms([_at(r, early, "test_err") for r in rs], scale=100), _ms([r["final_test_err"] for r in rs], scale=100),
            _ms([r["history"][-1]["test_nll"] for r in rs], "{:.3f}"),
            _ms([r["final_train_nll"] for r in rs], "{:.3f}"),
            _ms([r["test_err_batch_stats"] for r in rs], scale=100), _ms(gap, "{:+.1f}", 100)]) + " |")
        for r in rs:
            rows.append({"model": model, "norm": norm, "batch_size": b, "lr": r["config"]["lr"],
                         "seed": r["config"]["seed"], "status": r["status"], "updates": r["updates"],
                         f"test_err_at_{early}": _at(r, early, "test_err"), "final_test_err": r["final_test_err"],
                         "final_test_nll": r["history"][-1]["test_nll"], "final_train_nll": r["final_train_nll"],
                         "final_valid_err": r["final_valid_err"],
                         "test_err_batch_stats": r["test_err_batch_stats"], "seconds": round(r["seconds"], 2)})
    return "\n".join(lines) + "\n", rows


def tuning_table(tuning: list[dict]) -> tuple[str, list[dict]]:
    """Final validation error (%) of the tuning seed at each learning rate; the chosen one in bold."""
    lrs = sorted({r["config"]["lr"] for r in tuning})
    lines = ["| model | norm | batch | " + " | ".join(f"lr {x:g}" for x in lrs) + " |",
             "|---|---|---:|" + "---:|" * len(lrs)]
    rows = []
    for (model, norm, b), rs in _groups(tuning).items():
        best = choose_lr(rs)
        by = {r["config"]["lr"]: r for r in rs}
        cells = []
        for x in lrs:
            r = by.get(x)
            cell = "-" if r is None else (f"{100 * r['final_valid_err']:.1f}" if r["status"] == "completed"
                                          else r["status"])
            cells.append(f"**{cell}**" if x == best else cell)
            if r is not None:
                rows.append({"model": model, "norm": norm, "batch_size": b, "lr": x, "seed": r["config"]["seed"],
                             "status": r["status"], "final_valid_err": r["final_valid_err"],
                             "final_valid_nll": r["final_valid_nll"], "chosen": x == best})
        lines.append(f"| {model} | {norm} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", rows


# ---- figures ----

def _log_y(ax) -> None:
    """Log y with ticks at 1, 2, 5 x 10^k written plainly (0.0002, 0.5, 20), whatever the range."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _grid_figure(nrows: int, ncols: int, width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def plot_curves(reported: list[dict], key: str, ylabel: str, path: str | Path, title: str = "",
                scale: float = 1.0) -> Path:
    """``key`` of the history against updates: one row of panels per model, one column per batch size; mean over
    seeds with a min-max band, log y."""
    groups = _groups(reported)
    models = list(dict.fromkeys(k[0] for k in groups))
    sizes = sorted({k[2] for k in groups})
    fig, axes = _grid_figure(len(models), len(sizes), 3.1 * len(sizes), 2.7 * len(models) + 0.5)
    for i, model in enumerate(models):
        for j, b in enumerate(sizes):
            ax = axes[i][j]
            for (m, norm, bb), rs in groups.items():
                if m != model or bb != b:
                    continue
                ups = [row["update"] for row in rs[0]["history"] if row["update"] > 0]
                per = [[v * scale for v in (_at(r, u, key) for r in rs) if v is not None and math.isfinite(v)]
                       for u in ups]
                pts = [(u, p) for u, p in zip(ups, per) if p]
                if not pts:
                    continue
                xs, ps = zip(*pts)
                ax.plot(xs, [statistics.mean(p) for p in ps], color=COLORS[norm], lw=1.3, label=norm)
                ax.fill_between(xs, [min(p) for p in ps], [max(p) for p in ps], color=COLORS[norm], alpha=0.18)
            _log_y(ax)
            ax.set_title(f"{TITLES[model]}, batch {b}", fontsize=9)
            _axes_labels(ax, "updates" if i == len(models) - 1 else "", ylabel if j == 0 else "")
            if ax.get_legend() is not None:  # one legend per row, in its first panel
                ax.legend(fontsize=7) if j == 0 else ax.get_legend().remove()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_png(fig, path, dpi=110)


def plot_vs_batch(reported: list[dict], path: str | Path, title: str = "") -> Path:
    """Against the batch size, per model: test error early and final, final training nll, and BatchNorm's test
    error with batch statistics against running averages (mean over seeds, min-max bars)."""
    groups = _groups(reported)
    models = list(dict.fromkeys(k[0] for k in groups))
    early = early_update(reported)
    panels = ((f"test error (%) @ {early} upd.", lambda r: 100 * _at(r, early, "test_err")),
              ("final test error (%)", lambda r: 100 * r["final_test_err"]),
              ("final train nll (eval mode)", lambda r: r["final_train_nll"]))
    fig, axes = _grid_figure(len(models), 4, 13.0, 2.9 * len(models) + 0.5)
    for i, model in enumerate(models):
        norms = list(dict.fromkeys(k[1] for k in groups if k[0] == model))
        for j, (label, get) in enumerate(panels):
            ax = axes[i][j]
            for norm in norms:
                pts = sorted((b, [get(r) for r in rs]) for (m, n, b), rs in groups.items() if m == model and n == norm)
                _errorbar(ax, pts, COLORS[norm], norm)
            _log_y(ax)
            _batch_axes(ax, f"{TITLES[model]}: {label}", legend=j == 0)
        ax = axes[i][3]
        for mode, key, style in (("running averages (eval)", "final_test_err", "-"),
                                 ("batch statistics (train)", "test_err_batch_stats", "--")):
            pts = sorted((b, [100 * r[key] for r in rs]) for (m, n, b), rs in groups.items()
                         if m == model and n == "batchnorm")
            _errorbar(ax, pts, COLORS["batchnorm"], f"BN, {mode}", style)
        _log_y(ax)
        _batch_axes(ax, f"{TITLES[model]}: BN test error (%)", legend=True)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_png(fig, path, dpi=110)


def _errorbar(ax, pts, color, label, style="-") -> None:
    if not pts:
        return
    xs = [b for b, _ in pts]
    means = [statistics.mean(v) for _, v in pts]
    lo = [m - min(v) for m, (_, v) in zip(means, pts)]
    hi = [max(v) - m for m, (_, v) in zip(means, pts)]
    ax.errorbar(xs, means, yerr=[lo, hi], color=color, ls=style, marker="o", ms=3, capsize=2, label=label)


def _batch_axes(ax, title: str, legend: bool) -> None:
    from matplotlib.ticker import NullLocator

    ax.set_xscale("log", base=2)
    sizes = sorted({float(x) for line in ax.get_lines() for x in line.get_xdata()})
    ax.set_xticks(sizes, [f"{x:g}" for x in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("batch size")
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=7)


def write_results(reported: list[dict], tuning: list[dict], out: str | Path, what: str) -> str:
    """Tables (``ff_results.md``, ``ff_results.csv``, ``ff_tuning.csv``) and the three figures under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, rows = results_table(reported)
    text = table
    if tuning:
        ttable, trows = tuning_table(tuning)
        write_csv(trows, out / "ff_tuning.csv")
        text += "\nLearning-rate choice (final validation error %, tuning seed; chosen in bold):\n\n" + ttable
    write_text(out / "ff_results.md", text)
    write_csv(rows, out / "ff_results.csv")
    plot_curves(reported, "test_err", "test error (%)", out / "ff_test_error_vs_updates.png",
                f"{what}: test error against updates (mean over seeds, min-max band)", scale=100)
    plot_curves(reported, "train_nll", "train nll (eval mode)", out / "ff_train_nll_vs_updates.png",
                f"{what}: training-set nll against updates (mean over seeds, min-max band)")
    plot_vs_batch(reported, out / "ff_vs_batch_size.png", f"{what}: against the batch size")
    return text
