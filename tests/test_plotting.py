"""Plots: what is drawn (panels, lines, bands, labels, data) read back from the figure objects, and the files
written as PNG and PDF without pyplot (no display, no global backend change)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from transformer_ln.diagnostics.plotting import (dependency_figure, grad_norms_figure, output_change_bars_figure,
                                     output_change_figure, plot_curves, read_run)


def test_package_import_and_plotting_never_load_pyplot(tmp_path):
    code = ("import sys, numpy as np\n"
            "import transformer_ln, transformer_ln.diagnostics, transformer_ln.diagnostics.plotting as P\n"
            "assert 'matplotlib' not in sys.modules\n"
            f"P.plot_dependency({{'post_ln': {{'encoder': np.tri(2, 3, 1) / 2}}}}, r'{tmp_path}/d')\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "d.pdf").read_bytes()[:4] == b"%PDF"


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def test_dependency_figure_draws_each_beta_with_the_upper_triangle_blank():
    rng = np.random.default_rng(0)
    betas = {s: {"encoder": rng.random((4, 5)), "decoder": rng.random((6, 7))} for s in ("post_ln", "admin", "pre_ln")}
    fig = dependency_figure(betas, "init", columns=2)  # 3 schemes in rows of 2: one empty cell per stack
    panels = [ax for ax in _visible(fig) if ax.images]
    assert len(panels) == 6
    titles = [ax.get_title() for ax in panels]
    assert titles[0] == "Post-LN encoder (init)" and titles[3] == "Post-LN decoder (init)"
    shown = np.ma.filled(panels[4].images[0].get_array().astype(float), np.nan)  # Admin decoder
    b = betas["admin"]["decoder"]
    lower = np.tri(6, 7, k=1, dtype=bool)
    np.testing.assert_array_equal(shown[lower], b[lower])
    assert np.isnan(shown[~lower]).all()
    vmax = max(float(v[s][:, 1:].max()) for v in betas.values() for s in v)
    assert panels[0].images[0].get_clim() == (0.0, pytest.approx(vmax))
    assert panels[0].get_ylabel() == "sub-layer output $x_i$" and "component j" in panels[0].get_xlabel()


def _sweep(norm: str, seeds: int, text: str):
    n = [2, 4, 8, 16]
    res = {"post_ln": [1.0, 2.0, 4.0, 8.0], "pre_ln": [1.0, 1.7, 2.4, 3.1]}
    results = {}
    for k, y in res.items():
        linear = k == "post_ln"
        results[k] = {"sublayers": n, "output_change": y, "ci95": [[v * 0.9, v * 1.1] for v in y],
                      "fit": {"linear": {"a": 0.5, "b": 0.0, "r2": 1.0 if linear else 0.9},
                              "log": {"a": 1.0, "b": 0.3, "r2": 0.8 if linear else 1.0},
                              "better": "linear" if linear else "log"},
                      "fit_seeds": {"seeds": seeds, "wins": {"linear": seeds if linear else 0,
                                                             "log": 0 if linear else seeds},
                                    "linear": {"r2_mean": 0.95, "r2_sd": 0.01}, "log": {"r2_mean": 0.9, "r2_sd": 0.02}}}
    return {"config": {"seeds": seeds, "d_model": 16, "eps": 1e-4, "n_tokens": 40},
            "definition": {"norm": norm, "text": text}, "results": results}


def test_output_change_figure_one_column_per_definition_with_bands_and_fits():
    sweeps = [_sweep("squared", 5, "|ΔF|², stack output, eval mode, pads skipped"),
              _sweep("l2", 5, "|ΔF|, before final norm, train mode (fresh dropout masks), pads included")]
    fig = output_change_figure(sweeps)
    axes = _visible(fig)
    assert len(axes) == 4  # 2 rows (linear x, log x) x 2 definitions
    top_ours, top_ref = axes[0], axes[1]
    assert top_ours.get_title().startswith("|ΔF|², stack output") and "5 seeds" in top_ours.get_title()
    assert top_ref.get_title().startswith("|ΔF|, before final norm")
    assert top_ours.get_ylabel().endswith("_2^2$") and top_ref.get_ylabel().endswith("_2$")
    data = [ln for ln in top_ours.get_lines() if ln.get_marker() == "o"]
    assert [list(ln.get_ydata()) for ln in data] == [[1.0, 2.0, 4.0, 8.0], [1.0, 1.7, 2.4, 3.1]]
    assert len([ln for ln in top_ours.get_lines() if ln.get_linestyle() == "--"]) == 2  # one fit each
    bands = [c for c in top_ours.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2
    lo, hi = bands[0].get_paths()[0].vertices[:, 1].min(), bands[0].get_paths()[0].vertices[:, 1].max()
    assert (lo, hi) == (pytest.approx(0.9), pytest.approx(8.8))
    bottom = axes[2]
    assert bottom.get_xscale() == "log" and len([ln for ln in bottom.get_lines() if ln.get_marker() == "o"]) == 1
    labels = [t.get_text() for t in top_ours.get_legend().get_texts()]
    assert "a·log N+b better in 5/5 seeds" in labels[1] and labels[0].startswith("Post-LN")
    one = output_change_figure(_sweep("squared", 1, "x"))
    assert not [c for c in _visible(one)[0].collections if isinstance(c, PolyCollection)]  # one seed: no band


def test_output_change_bars_heights_and_intervals():
    changes = {"post_ln": {"encoder": 2.0, "decoder": 3.0}, "admin": {"encoder": 1.0, "decoder": 1.5}}
    ci = {k: {s: [v * 0.5, v * 2] for s, v in d.items()} for k, d in changes.items()}
    ax = _visible(output_change_bars_figure(changes, "init", ci, "|ΔF|, stack output, eval mode, pads skipped"))[0]
    assert sorted(round(p.get_height(), 6) for p in ax.patches) == [1.0, 1.5, 2.0, 3.0]
    assert ax.get_ylabel().endswith("_2$") and "eval mode" in ax.get_title()
    assert len([c for c in ax.collections if c.get_segments()]) == 2  # error bars per stack


def test_grad_norm_figure_lines_per_scheme_on_log_axes():
    norms = {s: {f"{st}.layers.{i}.ffn": {"stack": st, "index": i + 1, "output_grad_rel": (i + 1) / 4 * f,
                                         "param_grad_rel": 1.0} for st in ("encoder", "decoder") for i in range(3)}
             for s, f in (("post_ln", 1.0), ("pre_ln", 0.5))}
    axes = _visible(grad_norms_figure(norms, "best"))
    assert len(axes) == 4 and all(ax.get_yscale() == "log" for ax in axes)
    assert all(len(ax.get_lines()) == 2 for ax in axes)
    np.testing.assert_allclose(axes[0].get_lines()[1].get_ydata(), [0.125, 0.25, 0.375])
    assert axes[1].get_title() == "decoder: gradient at sub-layer outputs (best)"


def _run(path, status, n=6):
    path.mkdir()
    recs = [{"kind": "train", "update": u, "loss": 5.0 / u, "nll": 5.0 / u, "lr": 1e-4, "grad_norm": 2.0,
             "tokens_per_s": 1e3} for u in range(1, n + 1)]
    recs.append({"kind": "valid", "update": n, "epoch": 1, "loss": 1.5, "nll": 1.4, "ppl": 4.0})
    recs.append({"kind": "grad_norms", "update": n, "sublayers": {}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n{broken")
    (path / "summary.json").write_text(json.dumps({"status": status, "diverged_at": n if status == "diverged"
                                                   else None, "best_valid_loss": 1.5}))
    return path


def test_read_run_and_curves(tmp_path):
    a, b = _run(tmp_path / "pre_ln", "completed"), _run(tmp_path / "post_ln", "diverged", n=3)
    run = read_run(b)
    assert len(run["train"]) == 3 and len(run["valid"]) == 1 and run["summary"]["diverged_at"] == 3
    paths = plot_curves([a, b], tmp_path / "figs" / "curves.png")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)


def test_log_x_panel_draws_only_straight_fits_with_plain_tick_labels():
    sweep = _sweep("squared", 1, "x")
    for k in sweep["results"]:  # neither scheme fits a logarithm better: both land on the log panel, no fits there
        sweep["results"][k]["fit"]["better"] = "linear"
    fig = output_change_figure(sweep)
    fig.canvas.draw()
    bottom = _visible(fig)[1]
    assert len([ln for ln in bottom.get_lines() if ln.get_marker() == "o"]) == 2
    assert not [ln for ln in bottom.get_lines() if ln.get_linestyle() == "--"]  # a line is curved on log x
    ticks = [t.get_text() for t in bottom.get_xticklabels() if t.get_text()]
    assert ticks == ["2", "4", "8", "16"]
    assert not [t.get_text() for t in bottom.xaxis.get_minorticklabels() if t.get_text()]
    mixed = output_change_figure(_sweep("squared", 1, "x"))  # Pre-LN fits log N better: its fit is drawn there
    assert len([ln for ln in _visible(mixed)[1].get_lines() if ln.get_linestyle() == "--"]) == 1
