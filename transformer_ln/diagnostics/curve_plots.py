"""The training-curves figure: train/valid loss, learning rate, gradient norm and the panels the schemes add, read
from the ``metrics.jsonl`` of run directories (unreadable lines skipped with one warning), in ``plotting``'s style.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..model.schemes import SCHEMES
from .figure_fit import done as _done, new_figure as _figure, save


def read_metrics(path: str | Path) -> tuple[list[dict], list[str]]:
    """The records of a ``metrics.jsonl`` and what was wrong with each line left out (``"line 7: not UTF-8 (byte
    0xff)"``): a line that is not UTF-8, not JSON, not a JSON object, or cut short by a crash (the last, without its
    newline) is skipped, never fatal."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    records, skipped = [], []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            skipped.append(f"line {number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
            continue
        except ValueError:
            cut = number == len(lines)  # no newline after it: the write was interrupted
            skipped.append(f"line {number}: " + ("cut short (no newline: a write interrupted by a crash?)" if cut
                                                 else "not JSON"))
            continue
        if not isinstance(rec, dict):
            skipped.append(f"line {number}: not a JSON object")
            continue
        records.append(rec)
    return records, skipped


def read_run(run_dir: str | Path, warn: bool = True) -> dict[str, Any]:
    """``{"name", "train": [records], "valid": [records], "summary": {...}, "skipped": [reasons]}`` from
    metrics.jsonl and summary.json; lines of metrics.jsonl that cannot be read are left out (``read_metrics``)
    with, if ``warn``, one warning on stderr saying which."""
    import sys

    from ..runs.rundir import RunDir

    run = RunDir(run_dir)
    run_dir = run.path
    train, valid, skipped = [], [], []
    metrics = run.metrics
    if metrics.is_file():
        records, skipped = read_metrics(metrics)
        for rec in records:
            if rec.get("kind") == "train":
                train.append(rec)
            elif rec.get("kind") == "valid":
                valid.append(rec)
        if skipped and warn:
            shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
            print(f"warning: {metrics}: skipped {len(skipped)} unreadable line(s) ({shown}); the curves and "
                  f"numbers leave them out", file=sys.stderr, flush=True)
    summary = run.read_summary().to_dict() if run.summary.is_file() else {}
    return {"name": run_dir.name, "train": train, "valid": valid, "summary": summary, "skipped": skipped}


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["update"], r[key]) for r in records
           if r.get(key) is not None and "update" in r and math.isfinite(float(r[key]))]
    return ([p[0] for p in pts], [p[1] for p in pts]) if pts else ([], [])


def curves_figure(run_dirs: Iterable[str | Path | dict]):
    """Overlay the training curves of several runs (a ``Figure``; each run a directory or what ``read_run``
    returned for it): train/valid loss in bits per token (base 2, as
    the trainer logs them), lr, grad norm and the panels the schemes add (``ResidualScheme.curve_panels``, e.g.
    Admin's omega, min-mean-max), each only when a run logged its numbers.

    A diverged run (``summary.json`` status "diverged") ends in a cross at its last logged point, labelled with
    the update where it stopped.
    """
    runs = [d if isinstance(d, dict) else read_run(d) for d in run_dirs]
    panels = [("train", "loss", "train loss (bits/token)"), ("valid", "loss", "valid loss (bits/token)"),
              ("train", "lr", "learning rate"), ("train", "grad_norm", "gradient norm (before clipping)")]
    bands = {}
    for key, title, band in dict.fromkeys(p for cls in SCHEMES.values() for p in cls.curve_panels):
        if any(_series(run["train"], key)[0] for run in runs):  # no empty panel for schemes no run used
            panels.append(("train", key, title + (" (mean, band = min..max)" if band else "")))
            bands[key] = band
    rows = -(-(len(panels) + 1) // 3)  # and one cell for the legend
    fig = _figure(13, 3.75 * rows)
    axes = fig.subplots(rows, 3).ravel()
    colors = [f"C{i}" for i in range(10)]
    for k, run in enumerate(runs):
        color = colors[k % len(colors)]
        diverged = run["summary"].get("status") == "diverged"
        label = run["name"] + (f" (diverged at {run['summary'].get('diverged_at')})" if diverged else "")
        for ax, (kind, key, _) in zip(axes, panels):
            xs, ys = _series(run[kind], key)
            if not xs:
                continue
            ax.plot(xs, ys, "-" if kind == "train" else "o-", ms=3, color=color, label=label)
            if bands.get(key):
                lo, hi = _series(run[kind], bands[key][0]), _series(run[kind], bands[key][1])
                if len(lo[0]) == len(xs) == len(hi[0]):
                    ax.fill_between(xs, lo[1], hi[1], color=color, alpha=0.15)
            if diverged:
                ax.plot([xs[-1]], [ys[-1]], "x", ms=10, mew=2, color=color)
    for ax, (_, key, title) in zip(axes, panels):
        ax.set_xlabel("update")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ys = np.concatenate([np.asarray(line.get_ydata(), float) for line in ax.get_lines()] or [np.ones(1)])
        if key in ("loss", "grad_norm") and ys.min() > 0 and ys.max() / ys.min() > 20:
            ax.set_yscale("log")  # a divergence spans decades
    for ax in axes[len(panels):-1]:
        ax.set_visible(False)
    axes[-1].axis("off")
    legend: dict[str, Any] = {}
    for ax in axes[:len(panels)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    if legend:
        axes[-1].legend(list(legend.values()), list(legend), loc="center", title="run (x = diverged)")
    fig.suptitle("Training curves: " + ", ".join(r["name"] for r in runs))
    return _done(fig)


def plot_curves(run_dirs: Iterable[str | Path | dict], out: str | Path, dpi: int = 150) -> list[Path]:
    """``curves_figure`` written as PNG and PDF."""
    return save(curves_figure(run_dirs), out, dpi)
