"""Figures of the learning-rate-sensitivity sweep (``training.lr_sweep``, ``training.lr_study``): final loss against
learning rate per scheme (one figure per depth; diverged runs drawn at l0 with an x, as the LRS counts them), the LRS
per scheme, the largest attention logit and the mean log Z over training at the largest learning rates, and the
per-layer depth profiles (hidden-state variance, angular distance to the next layer, loss increase when skipped).

A scheme with options (``pre_ln+qk_norm``) takes its base scheme's colour with a line style of its own.
"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import mean
from typing import Any, Mapping

import numpy as np

from .plotting import SCHEME_COLORS, _figure, save, scheme_label

STYLES = ["-", "--", ":", "-."]


def _style(schemes: list[str]) -> dict[str, tuple[str, str, str]]:
    """``{scheme: (colour, linestyle, label)}``: base scheme's colour, variants dashed/dotted."""
    out, seen = {}, {}
    for k, s in enumerate(sorted(schemes, key=lambda s: (s.split("+")[0], s))):
        base, *opts = s.split("+")
        n = seen.setdefault(base, 0)
        seen[base] = n + 1
        colour = SCHEME_COLORS.get(base) or f"C{k % 10}"
        out[s] = (colour, STYLES[n % len(STYLES)], " + ".join([scheme_label(base), *opts]))
    return out


def loss_vs_lr_figure(rows: list[dict], depth: int):
    """Final validation loss (bits/token) against learning rate, mean over seeds of the capped loss; x: a run
    that diverged or ended above l0; the grey line: l0."""
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    rows = [r for r in rows if r["depth"] == depth]
    styles = _style(sorted({r["scheme"] for r in rows}))
    for scheme, (colour, ls, label) in styles.items():
        rs = [r for r in rows if r["scheme"] == scheme and r["capped_loss"] is not None]
        lrs = sorted({r["lr"] for r in rs})
        ys = [mean(r["capped_loss"] for r in rs if r["lr"] == lr) for lr in lrs]
        ax.plot(lrs, ys, ls, color=colour, marker="o", ms=3, label=label)
        bad = [(r["lr"], r["capped_loss"]) for r in rs if r["final_loss"] is None or r["final_loss"] >= r["l0"]]
        if bad:
            ax.scatter(*zip(*bad), marker="x", color=colour, s=40, zorder=3)
    l0s = [r["l0"] for r in rows if r["l0"] is not None]
    if l0s:
        ax.axhline(mean(l0s), color="0.6", lw=0.8, label="l0 (loss at init)")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (bits/token)")
    ax.set_title(f"{depth} layers: final loss vs learning rate (x: diverged or above l0, counted as l0)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig


def lrs_figure(sens: list[dict]):
    """LR sensitivity per scheme, one bar group per depth, one dot per seed."""
    depths = sorted({s["depth"] for s in sens})
    schemes = sorted({s["scheme"] for s in sens})
    styles = _style(schemes)
    fig = _figure(max(6.0, 0.6 * len(schemes) * len(depths)), 3.8)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(depths))
    for j, depth in enumerate(depths):
        for i, scheme in enumerate(schemes):
            vals = [s["lrs"] for s in sens if s["scheme"] == scheme and s["depth"] == depth and
                    not math.isnan(s["lrs"])]
            if not vals:
                continue
            x = i + (j - (len(depths) - 1) / 2) * width
            ax.bar(x, mean(vals), width * 0.9, color=styles[scheme][0], alpha=0.35 + 0.5 * j / max(1, len(depths)),
                   hatch=None if styles[scheme][1] == "-" else "//", edgecolor="k", lw=0.4)
            ax.scatter([x] * len(vals), vals, color="k", s=8, zorder=3)
            ax.text(x, 0, f"{depth}L", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(schemes)), [styles[s][2] for s in schemes], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("LR sensitivity (bits)")
    ax.set_title("LRS = mean over LRs of min(loss, l0) - best loss (Wortsman et al. 2023); dots: seeds", fontsize=9)
    return fig


def traces_figure(traces: Mapping[str, Mapping[str, Any]]):
    """Max attention logit and mean log Z against update, one line per traced run (colour: scheme, marker: LR)."""
    fig = _figure(10, 4.0 * max(1, len({t["depth"] for t in traces.values()})))
    depths = sorted({t["depth"] for t in traces.values()}) or [0]
    axes = fig.subplots(len(depths), 2, squeeze=False)
    styles = _style(sorted({t["scheme"] for t in traces.values()}))
    lrs = sorted({t["lr"] for t in traces.values()})
    markers = dict(zip(lrs, "os^vD"))
    for row, depth in zip(axes, depths):
        for t in traces.values():
            if t["depth"] != depth or not t["update"]:
                continue
            colour, ls, label = styles[t["scheme"]]
            kw = dict(color=colour, ls=ls, marker=markers.get(t["lr"], "o"), ms=3)
            row[0].plot(t["update"], t["max_attn_logit"], label=f"{label}, lr {t['lr']:g}", **kw)
            row[1].plot(t["update"], t["log_z_mean"], **kw)
        row[0].set_ylabel("max attention logit (log scale)")
        row[0].set_yscale("log")
        row[1].set_ylabel("mean log Z of the output (z-loss pulls it to 0)")
        for ax in row:
            ax.set_xlabel("update")
            ax.set_title(f"{depth} layers", fontsize=9)
        row[0].legend(fontsize=6, ncol=2)
    return fig


def profiles_figure(profiles: Mapping[str, Mapping[str, Any]], depth: int):
    """Per layer, mean over seeds: hidden-state variance (log), angular distance d(l, l+1), loss increase when
    layer l is skipped (bits/token), for each scheme's best-LR run at ``depth``."""
    fig = _figure(13, 3.8)
    axes = fig.subplots(1, 3)
    chosen = [p for p in profiles.values() if p["depth"] == depth]
    styles = _style(sorted({p["scheme"] for p in chosen}))
    for scheme, (colour, ls, label) in styles.items():
        ps = [p for p in chosen if p["scheme"] == scheme]
        for ax, key, start in zip(axes, ("variance", "angular", "removal_bits"), (0, 0, 1)):
            y = np.mean([p[key] for p in ps], axis=0)
            ax.plot(np.arange(start, start + len(y)), y, ls, color=colour, marker="o", ms=2.5, label=label)
    axes[0].set_yscale("log")
    titles = ("hidden-state variance after layer l (l=0: embedding)", "angular distance d(h_l, h_{l+1})",
              "loss increase when layer l is skipped (bits)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer l")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{depth} layers: each scheme's best-LR run (mean over seeds)", fontsize=10)
    return fig


def plot_lr_sweep(rows: list[dict], sens: list[dict], analysis: Mapping[str, Any] | None, out: str | Path,
                  dpi: int = 130) -> list[Path]:
    """Every figure of the sweep under ``out`` (PNG and PDF each); returns the paths."""
    out = Path(out)
    made: list[Path] = []
    for depth in sorted({r["depth"] for r in rows}):
        made += save(loss_vs_lr_figure(rows, depth), out / f"loss_vs_lr_{depth}L", dpi)
    if sens:
        made += save(lrs_figure(sens), out / "lr_sensitivity", dpi)
    if analysis and analysis.get("traces"):
        made += save(traces_figure(analysis["traces"]), out / "attention_logits_and_log_z", dpi)
    for depth in sorted({p["depth"] for p in (analysis or {}).get("profiles", {}).values()}):
        made += save(profiles_figure(analysis["profiles"], depth), out / f"depth_profiles_{depth}L", dpi)
    return made
