"""Figures of the analysis: beta heatmaps, output change against depth, gradient norms (training curves:
``curve_plots``).

matplotlib is imported inside each function and only through ``matplotlib.figure.Figure`` (the Agg canvas), never
pyplot: importing the package stays cheap and never touches a display or the global backend. Every figure is
written as PNG and PDF; titles name the scheme, the stack, the checkpoint ("init" for a fresh model) and the batch
measured on; every figure fits a page and its titles fit it at any number of schemes (``figure_fit``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..model.schemes import SCHEMES
from ..model.sublayer import STACKS
from .figure_fit import done as _done, new_figure as _figure, save  # noqa: F401 (depth_plots, tests)

SCHEME_LABELS = {name: cls.label for name, cls in SCHEMES.items()}  # the registry's, so a new scheme needs no edit
SCHEME_COLORS = {name: cls.color for name, cls in SCHEMES.items()}


def scheme_label(name: str) -> str:
    return SCHEME_LABELS.get(name, name)


def dependency_figure(betas: Mapping[str, Mapping[str, np.ndarray]], checkpoint: str = "init", columns: int = 5):
    """Heatmaps of beta_{i,j}: one panel per scheme and stack, one shared colour scale (a ``Figure``).

    Schemes fill rows of at most ``columns`` panels; each stack gets its own block of rows (encoder first).

    Args:
        betas: ``{scheme: {"encoder": (n, n+1), "decoder": (m, m+1)}}`` from ``residual_dependency``.
        checkpoint: shown in the titles ("init", "best", a file name).
    """
    schemes = list(betas)
    stacks = [s for s in STACKS if any(s in betas[k] for k in schemes)]
    # the colour scale follows the branch columns (the paper does not draw x_0); larger x_0 values saturate
    vmax = max(float(np.max(betas[k][s][:, 1:])) for k in schemes for s in stacks if s in betas[k])
    vmax = vmax if vmax > 0 else 1.0
    extend = "max" if any(float(np.max(betas[k][s])) > vmax for k in schemes for s in stacks if s in betas[k]) \
        else "neither"
    cols = min(columns, len(schemes))
    per_stack = math.ceil(len(schemes) / cols)
    fig = _figure(4.2 * cols, 3.6 * per_stack * len(stacks))
    axes = np.atleast_2d(fig.subplots(per_stack * len(stacks), cols, squeeze=False))
    image = None
    for r0, stack in enumerate(stacks):
        for k, scheme in enumerate(schemes):
            ax = axes[r0 * per_stack + k // cols, k % cols]
            b = np.asarray(betas[scheme].get(stack, np.zeros((0, 1))), float)
            n = b.shape[0]
            shown = np.where(np.tri(n, n + 1, k=1, dtype=bool), b, np.nan)  # blank right of the diagonal
            image = ax.imshow(shown, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto", interpolation="nearest")
            ticks = list(range(0, n + 1, max(1, (n + 1) // 8)))
            ax.set_xticks(ticks, ["$x_0$" if j == 0 else f"$a_{{{j}}}$" for j in ticks])
            rows = list(range(0, n, max(1, n // 8)))
            ax.set_yticks(rows, [f"$x_{{{i + 1}}}$" for i in rows])
            ax.set_xlabel("component j (stack input $x_0$, branch $a_j$)")
            ax.set_ylabel("sub-layer output $x_i$")
            ax.set_title(f"{scheme_label(scheme)} {stack} ({checkpoint})")
        for k in range(len(schemes), per_stack * cols):  # empty cells of the last row
            axes[r0 * per_stack + k // cols, k % cols].set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label=r"dependency $\beta_{i,j}$", shrink=0.6, extend=extend)
    sep = " " if cols > 2 else "\n"  # a narrow figure would clip the one-line title
    fig.suptitle(r"Residual-branch dependency $\beta_{i,j}$" + sep + "(rows: unit norm; diagonal: own branch)")
    return _done(fig)


def plot_dependency(betas: Mapping[str, Mapping[str, np.ndarray]], out: str | Path,
                    checkpoint: str = "init", dpi: int = 150, columns: int = 5) -> list[Path]:
    """``dependency_figure`` written as PNG and PDF."""
    return save(dependency_figure(betas, checkpoint, columns), out, dpi)


def change_label(definition: Mapping[str, Any] | None) -> str:
    """The y-axis label of an output change: squared or plain L2 norm, as the definition says."""
    squared = (definition or {}).get("norm", "squared") == "squared"
    return r"$|F(x,W) - F(x,W^*)|_2^2$" if squared else r"$|F(x,W) - F(x,W^*)|_2$"


def _fit_note(r: Mapping[str, Any]) -> str:
    """'log fits better in 5/5 seeds (R² lin 0.91±0.02, log 0.99±0.00)' or, with one seed, the fit on the curve."""
    seeds = r.get("fit_seeds")
    if seeds and seeds.get("seeds", 1) > 1:
        win = max(("linear", "log"), key=lambda k: seeds["wins"][k])
        return (f"{'a·N+b' if win == 'linear' else 'a·log N+b'} better in {seeds['wins'][win]}/{seeds['seeds']} "
                f"seeds; R² lin {seeds['linear']['r2_mean']:.3f}±{seeds['linear']['r2_sd']:.3f}, "
                f"log {seeds['log']['r2_mean']:.3f}±{seeds['log']['r2_sd']:.3f}")
    f = r.get("fit")
    if not f:
        return ""
    best = f[f["better"]]
    return f"better fit: {'a·N+b' if f['better'] == 'linear' else 'a·log N+b'}, R²={best['r2']:.3f}"


def output_change_figure(sweeps: Mapping[str, Any] | list[Mapping[str, Any]], checkpoint: str = "init"):
    """Output change against the swept stack's sub-layers N (the sweep's ``config["stack"]``: the encoder, or a
    decoder-only model's decoder), one column per sweep (definition): all schemes on linear x
    (top), and on log x (bottom) the schemes whose better fit is a*log(N)+b (straight lines there). Lines are the
    means over seeds, bands their 95% intervals, dashes each scheme's better fit to the means."""
    sweeps = [sweeps] if isinstance(sweeps, Mapping) else list(sweeps)
    n_schemes = max(len(sw["results"]) for sw in sweeps)
    stack = sweeps[0].get("config", {}).get("stack", "encoder")
    per_layer = sweeps[0].get("config", {}).get("sublayers_per_layer", 2)
    fig = _figure(6.8 * len(sweeps), 8.5 if n_schemes <= 4 else 11)
    axes = fig.subplots(2, len(sweeps), squeeze=False)
    for col, sweep in enumerate(sweeps):
        results, cfg, defn = sweep["results"], sweep.get("config", {}), sweep.get("definition", {})
        log_like = [k for k, r in results.items() if r.get("fit") and r["fit"]["better"] == "log"] or list(results)
        top, bottom = axes[0, col], axes[1, col]
        for scheme, r in results.items():
            n, y = np.asarray(r["sublayers"], float), np.asarray(r["output_change"], float)
            color = SCHEME_COLORS.get(scheme)
            note = _fit_note(r)
            label = scheme_label(scheme) + (f" ({note})" if note else "")
            f = r.get("fit")
            for ax in (top, bottom) if scheme in log_like else (top,):
                ax.plot(n, y, "o-", ms=3, color=color, label=label)
                if r.get("ci95") and cfg.get("seeds", 1) > 1:
                    lo, hi = np.asarray(r["ci95"], float).T
                    ax.fill_between(n, lo, hi, color=color, alpha=0.2, linewidth=0)
                if f and (ax is top or f["better"] == "log"):  # a fit drawn only where it is a straight line
                    best = f[f["better"]]
                    grid = np.linspace(n.min(), n.max(), 200)
                    x = grid if f["better"] == "linear" else np.log(grid)
                    ax.plot(grid, best["a"] * x + best["b"], "--", color=color, alpha=0.6)
        for ax, scale in ((top, "linear"), (bottom, "log")):
            ax.set_xscale(scale)
            if scale == "log":  # plain numbers at the measured N, not 2x10^0 minor-tick labels
                from matplotlib.ticker import NullFormatter, ScalarFormatter

                ax.set_xticks(sorted({int(v) for r in results.values() for v in r["sublayers"]}))
                ax.xaxis.set_major_formatter(ScalarFormatter())
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"{stack} sub-layers N ({per_layer} per layer)" + (", log scale" if scale == "log" else ""))
            ax.set_ylabel(change_label(defn))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6.5 if len(results) > 4 else 7.5)
        name = defn.get("text", "|ΔF|², stack output, eval mode, pads skipped")
        seeds = cfg.get("seeds", 1)
        top.set_title(f"{name}\n{seeds} seed{'s' if seeds > 1 else ''}, band = 95% interval; linear x", fontsize=9)
        bottom.set_title("log x: " + ", ".join(scheme_label(k) for k in log_like), fontsize=9)
    cfg = sweeps[0].get("config", {})
    detail = (f"d_model={cfg.get('d_model', '?')}, eps={cfg.get('eps', '?')}, {cfg.get('n_tokens', '?')} tokens, "
              f"{cfg.get('perturbation', 'random')} perturbation")
    head = f"{stack.capitalize()} output change under a ±eps weight perturbation"
    # one column is too narrow for one line
    fig.suptitle(f"{head} ({checkpoint}; {detail})" if len(sweeps) > 1 else f"{head} ({checkpoint})\n{detail}")
    return _done(fig)


def plot_output_change(sweeps: Mapping[str, Any] | list[Mapping[str, Any]], out: str | Path,
                       checkpoint: str = "init", dpi: int = 150) -> list[Path]:
    """``output_change_figure`` written as PNG and PDF."""
    return save(output_change_figure(sweeps, checkpoint), out, dpi)


def output_change_bars_figure(changes: Mapping[str, Mapping[str, float]], checkpoint: str = "init",
                              ci95: Mapping[str, Mapping[str, list[float]]] | None = None,
                              definition: str = "|ΔF|², stack output, eval mode, pads skipped"):
    """Bars of the output change per scheme and stack (a single model each), 95% intervals as error bars."""
    schemes = list(changes)
    stacks = [s for s in STACKS if any(s in changes[k] for k in schemes)]
    fig = _figure(min(10.0, max(4.5, 0.8 * len(schemes) + 1.5)), 3.8)
    ax = fig.subplots()
    width = 0.8 / len(stacks)
    x = np.arange(len(schemes))
    for k, stack in enumerate(stacks):
        vals = np.array([changes[s].get(stack, np.nan) for s in schemes], float)
        err = None
        if ci95:
            lo = np.array([ci95[s][stack][0] for s in schemes], float)
            hi = np.array([ci95[s][stack][1] for s in schemes], float)
            err = np.stack([vals - lo, hi - vals])
        ax.bar(x + (k - (len(stacks) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=stack)
    ax.set_xticks(x, [scheme_label(s) for s in schemes], rotation=30 if len(schemes) > 6 else 0, ha="right"
                  if len(schemes) > 6 else "center", rotation_mode="anchor")
    ax.set_ylabel(change_label({"norm": "l2" if definition.startswith("|ΔF|,") else "squared"}))
    ax.set_xlabel("residual scheme")
    ax.legend()
    ax.set_title(f"Output change per stack ({checkpoint})\n{definition}", fontsize=9)
    return _done(fig)


def plot_output_change_bars(changes: Mapping[str, Mapping[str, float]], out: str | Path,
                            checkpoint: str = "init", dpi: int = 150,
                            ci95: Mapping[str, Mapping[str, list[float]]] | None = None,
                            definition: str = "|ΔF|², stack output, eval mode, pads skipped") -> list[Path]:
    """``output_change_bars_figure`` written as PNG and PDF."""
    return save(output_change_bars_figure(changes, checkpoint, ci95, definition), out, dpi)


def grad_norms_figure(norms: Mapping[str, Mapping[str, Mapping[str, Any]]], checkpoint: str = "init"):
    """Relative gradient norms per sub-layer (log y): rows = output / parameter gradients, columns = the stacks the
    models have (one column, "decoder", for decoder-only models).

    Args:
        norms: ``{scheme: gradient_norms(...)}``.
    """
    stacks = [s for s in STACKS if any(v["stack"] == s for rows in norms.values() for v in rows.values())] \
        or list(STACKS)
    kinds = (("output_grad_rel", r"$|\partial L/\partial x_i|$ / max"),
             ("param_grad_rel", r"$|\partial L/\partial \theta_i|$ / max"))
    fig = _figure(5.5 * len(stacks) + (1.5 if len(stacks) == 1 else 0), 7.5)
    axes = fig.subplots(2, len(stacks), squeeze=False)
    for r, (key, ylabel) in enumerate(kinds):
        for c, stack in enumerate(stacks):
            ax = axes[r, c]
            zeros, positive = [], []  # exact zeros (ReZero's branches at init) are drawn as such, at the floor
            for scheme, rows in norms.items():
                pts = sorted((v["index"], v[key]) for v in rows.values() if v["stack"] == stack)
                if pts:
                    idx, val = (np.asarray(a, float) for a in zip(*pts))
                    ax.plot(idx, np.where(val > 0, val, np.nan), "o-", ms=3, color=SCHEME_COLORS.get(scheme),
                            label=scheme_label(scheme))
                    positive += val[val > 0].tolist()
                    if (val <= 0).any():
                        zeros.append((idx[val <= 0], scheme))
            ax.set_yscale("log")
            if zeros:
                floor = min(positive) / 4 if positive else 1.0
                for idx, scheme in zeros:
                    ax.plot(idx, np.full(len(idx), floor), "v", ms=7, mfc="none", color=SCHEME_COLORS.get(scheme),
                            label=f"{scheme_label(scheme)}: exactly 0")
                ax.set_ylim(bottom=floor / 2)
            ax.set_xlabel(f"{stack} sub-layer i (input side → output side)")
            ax.set_ylabel(ylabel)
            what = "sub-layer outputs" if key.startswith("output") else "sub-layer parameters"
            ax.set_title(f"{stack}: gradient at {what} ({checkpoint})")
            ax.grid(alpha=0.3, which="both")
    from matplotlib.ticker import MaxNLocator

    legend: dict[str, Any] = {}  # one legend below the panels, whatever the number of schemes
    for ax in axes.ravel():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    zero = any(label.endswith("exactly 0") for label in legend)
    fig.legend(list(legend.values()), list(legend), loc="outside lower center", fontsize=8,
               ncols=min(len(legend), 5), title="▽: exactly 0, drawn at the floor" if zero else None,
               title_fontsize=8)
    names = ", ".join(scheme_label(s) for s in norms)
    sep = " " if len(stacks) > 1 else "\n"  # one column is too narrow for one line
    fig.suptitle(f"Relative gradient norms, each divided by the largest in the same network{sep}({names})")
    return _done(fig)


def plot_grad_norms(norms: Mapping[str, Mapping[str, Mapping[str, Any]]], out: str | Path,
                    checkpoint: str = "init", dpi: int = 150) -> list[Path]:
    """``grad_norms_figure`` written as PNG and PDF."""
    return save(grad_norms_figure(norms, checkpoint), out, dpi)


# the training curves live in ``curve_plots``; imported here too, where they have always been found
from .curve_plots import curves_figure, plot_curves, read_metrics, read_run  # noqa: E402,F401
