"""Plots: written as PNG and PDF without pyplot (no display, no global backend change), from fake run folders."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from transformer_ln.plotting import plot_curves, plot_dependency, plot_grad_norms, read_run


def test_package_import_and_plotting_never_load_pyplot(tmp_path):
    code = ("import sys, numpy as np\n"
            "import transformer_ln, transformer_ln.diagnostics, transformer_ln.plotting as P\n"
            "assert 'matplotlib' not in sys.modules\n"
            f"P.plot_dependency({{'post_ln': {{'encoder': np.tri(2, 3, 1) / 2}}}}, r'{tmp_path}/d')\n"
            "assert 'matplotlib.pyplot' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "d.png").stat().st_size > 1000 and (tmp_path / "d.pdf").stat().st_size > 1000


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


def test_dependency_and_grad_norm_figures(tmp_path):
    beta = {"encoder": np.tri(4, 5, 1) / 2, "decoder": np.tri(6, 7, 1) / 3}
    assert all(p.stat().st_size > 1000 for p in plot_dependency({"post_ln": beta, "admin": beta}, tmp_path / "b"))
    norms = {f"{s}.layers.{i}.ffn": {"stack": s, "index": i + 1, "output_grad_rel": 0.5, "param_grad_rel": 1.0}
             for s in ("encoder", "decoder") for i in range(3)}
    assert all(p.stat().st_size > 1000 for p in plot_grad_norms({"pre_ln": norms}, tmp_path / "g", "best"))
