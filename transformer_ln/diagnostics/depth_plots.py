"""Figures of today's depth analyses (``depth_stats``), in the style of ``plotting``: hidden-state variance and norm
against depth (log y), angular distance heatmaps over (gap n, layer l), the loss change per skipped layer (bars),
the largest attention logit per layer and the log-partition spread.

Each ``*_figure`` takes ``{label: result}`` (label: a scheme of ours, coloured as everywhere, or a model's name) and
returns a ``Figure``; each ``plot_*`` writes it as PNG and PDF (``plotting.save``). matplotlib only through
``matplotlib.figure.Figure``, imported inside the functions.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..model.sublayer import STACKS
from .plotting import SCHEME_COLORS, _done, _figure, save, scheme_label

Results = Mapping[str, Mapping[str, Mapping[str, Any]]]  # {label: {stack: result}}


def _stacks(results: Results) -> list[str]:
    return [s for s in STACKS if any(s in r for r in results.values())] or list(STACKS)


def _color(label: str, k: int) -> str:
    return SCHEME_COLORS.get(label) or f"C{k % 10}"


def _readable_log_y(ax) -> None:
    """Plain tick labels on a log axis spanning less than two decades (not 9.975x10^-1)."""
    from matplotlib.ticker import FuncFormatter

    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 100:
        plain = FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)


def _integer_x(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in np.ravel(axes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def hidden_states_figure(stats: Results, checkpoint: str = "init"):
    """Variance (top) and mean per-token norm (bottom) of h_l against l, log y; one column per stack."""
    stacks = _stacks(stats)
    fig = _figure(5.5 * len(stacks) + (1.5 if len(stacks) == 1 else 0), 7)
    axes = fig.subplots(2, len(stacks), squeeze=False)
    panels = (("variance", r"variance of $h_l$ (per sequence, mean)"), ("norm", r"mean $|h_l|_2$ per token"))
    for r, (key, ylabel) in enumerate(panels):
        for c, stack in enumerate(stacks):
            ax = axes[r, c]
            for k, (label, res) in enumerate(stats.items()):
                if stack in res:
                    y = np.asarray(res[stack][key], float)
                    ax.plot(res[stack]["layer"], np.where(y > 0, y, np.nan), "o-", ms=3, color=_color(label, k),
                            label=scheme_label(label))
            ax.set_yscale("log")
            ax.set_xlabel(f"{stack} layer l (0: embedding output; before the final norm)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{stack} ({checkpoint})", fontsize=10)
            ax.grid(alpha=0.3, which="both")
            _readable_log_y(ax)
    _integer_x(axes)
    axes[0, 0].legend()
    fig.suptitle("Hidden-state variance and norm against depth (real tokens)")
    return _done(fig)


def plot_hidden_states(stats: Results, out: str | Path, checkpoint: str = "init", dpi: int = 150) -> list[Path]:
    return save(hidden_states_figure(stats, checkpoint), out, dpi)


def angular_figure(dists: Results, checkpoint: str = "init", columns: int = 5):
    """Heatmaps of d(l, n) = arccos(cos(h_l, h_{l+n}))/pi: x the first layer l, y the gap n; one panel per label
    and stack (stacks in their own rows), one shared colour scale, blank where l + n > L."""
    labels, stacks = list(dists), _stacks(dists)
    values = [np.asarray(dists[k][s]["distance"], float) for k in labels for s in stacks if s in dists[k]]
    vmax = max([float(np.nanmax(v)) for v in values if np.isfinite(v).any()] + [1e-12])
    cols = min(columns, len(labels))
    per_stack = math.ceil(len(labels) / cols)
    fig = _figure(4.2 * cols + 0.8, 3.6 * per_stack * len(stacks))
    axes = np.atleast_2d(fig.subplots(per_stack * len(stacks), cols, squeeze=False))
    image = None
    for r0, stack in enumerate(stacks):
        for k, label in enumerate(labels):
            ax = axes[r0 * per_stack + k // cols, k % cols]
            if stack not in dists[label]:
                ax.set_visible(False)
                continue
            res = dists[label][stack]
            d, gaps = np.asarray(res["distance"], float), list(res["gaps"])
            image = ax.imshow(d, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto", origin="lower",
                              interpolation="nearest")
            L = d.shape[1]
            xs = list(range(0, L, max(1, L // 8)))
            ax.set_xticks(xs, [str(x) for x in xs])
            ys = list(range(0, len(gaps), max(1, len(gaps) // 8)))
            ax.set_yticks(ys, [str(gaps[y]) for y in ys])
            ax.set_xlabel(r"layer l ($h_l$ against $h_{l+n}$; 0: embedding output)")
            ax.set_ylabel("gap n (layers)")
            ax.set_title(f"{scheme_label(label)} {stack} ({checkpoint})", fontsize=10)
        for k in range(len(labels), per_stack * cols):
            axes[r0 * per_stack + k // cols, k % cols].set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label=r"angular distance $\arccos(\cos)/\pi$", shrink=0.6)
    token = next(iter(next(iter(dists.values())).values())).get("token", "all")
    sep = " " if cols > 2 else "\n"
    fig.suptitle(f"Angular distance between hidden states n layers apart{sep}({token} real tokens; small: the "
                 "layers change the stream little)")
    return _done(fig)


def plot_angular(dists: Results, out: str | Path, checkpoint: str = "init", dpi: int = 150) -> list[Path]:
    return save(angular_figure(dists, checkpoint), out, dpi)


def layer_removal_figure(removal: Results, checkpoint: str = "init"):
    """Bars of the loss change with layer l skipped (grouped by label), one column per stack."""
    stacks = _stacks(removal)
    labels = list(removal)
    fig = _figure(max(5.5, 0.35 * max(len(r[s]["delta"]) for r in removal.values() for s in r) * len(labels))
                  * len(stacks), 4.2)
    axes = fig.subplots(1, len(stacks), squeeze=False)[0]
    width = 0.8 / len(labels)
    for ax, stack in zip(axes, stacks):
        for k, label in enumerate(labels):
            if stack not in removal[label]:
                continue
            res = removal[label][stack]
            delta = np.asarray(res["delta"], float)
            x = np.arange(1, len(delta) + 1) + (k - (len(labels) - 1) / 2) * width
            ax.bar(x, delta, width, color=_color(label, k),
                   label=f"{scheme_label(label)} (whole model {res['base_loss']:.3g})")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{stack} layer l skipped (its output replaced by its input)")
        ax.set_ylabel("loss change (skipped − whole model)")
        ax.set_title(f"{stack} ({checkpoint})", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    _integer_x(axes)
    fig.suptitle("Loss change with one layer skipped (layer removal)")
    return _done(fig)


def plot_layer_removal(removal: Results, out: str | Path, checkpoint: str = "init", dpi: int = 150) -> list[Path]:
    return save(layer_removal_figure(removal, checkpoint), out, dpi)


def attention_logits_figure(logits: Results, checkpoint: str = "init"):
    """The largest attention logit of each attention against its layer (self- and cross-attention marked apart),
    one column per stack."""
    stacks = _stacks(logits)
    fig = _figure(5.5 * len(stacks) + (1.5 if len(stacks) == 1 else 0), 4.2)
    axes = fig.subplots(1, len(stacks), squeeze=False)[0]
    marks = {"self_attn": ("o-", "self"), "cross_attn": ("s--", "cross")}
    for ax, stack in zip(axes, stacks):
        for k, (label, res) in enumerate(logits.items()):
            if stack not in res:
                continue
            kinds, values = list(res[stack]["kinds"]), np.asarray(res[stack]["max"], float)
            for kind in dict.fromkeys(kinds):
                y = [v for v, kd in zip(values, kinds) if kd == kind]
                style, name = marks.get(kind, ("^-", kind))
                ax.plot(range(1, len(y) + 1), y, style, ms=4, color=_color(label, k),
                        label=scheme_label(label) + (f" ({name})" if len(set(kinds)) > 1 else ""))
        ax.set_xlabel(f"{stack} layer")
        ax.set_ylabel(r"max $q\cdot k \times$ scale")
        ax.set_title(f"{stack} ({checkpoint})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _integer_x(axes)
    fig.suptitle("Largest attention logit per layer (over heads, real queries and allowed keys)")
    return _done(fig)


def plot_attention_logits(logits: Results, out: str | Path, checkpoint: str = "init", dpi: int = 150) -> list[Path]:
    return save(attention_logits_figure(logits, checkpoint), out, dpi)


def log_partition_figure(parts: Mapping[str, Mapping[str, float]], checkpoint: str = "init"):
    """Per label: log Z's mean ± std (bar), its min and max (markers) over the real tokens."""
    labels = list(parts)
    fig = _figure(max(4.5, 1.2 * len(labels) + 2), 3.8)
    ax = fig.subplots()
    for k, label in enumerate(labels):
        r = parts[label]
        color = _color(label, k)
        ax.errorbar([k], [r["mean"]], yerr=[[r["std"]], [r["std"]]], fmt="o", ms=6, capsize=5, color=color)
        ax.plot([k, k], [r["min"], r["max"]], ":", color=color)
        ax.plot([k], [r["min"]], "v", color=color)
        ax.plot([k], [r["max"]], "^", color=color)
    ax.set_xticks(range(len(labels)), [scheme_label(s) for s in labels])
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylabel(r"$\log Z$ = logsumexp(logits) per token")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Output log-partition ({checkpoint})\nmean ± std, ▼ min, ▲ max over real tokens", fontsize=9)
    return _done(fig)


def plot_log_partition(parts: Mapping[str, Mapping[str, float]], out: str | Path, checkpoint: str = "init",
                       dpi: int = 150) -> list[Path]:
    return save(log_partition_figure(parts, checkpoint), out, dpi)
