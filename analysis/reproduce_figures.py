"""Rebuild the paper's initialisation-time figures for every registered scheme on a CPU.

    python analysis/reproduce_figures.py --out figs [--max-depth 50] [--samples 2] [--schemes a,b] [--norm rmsnorm]

1. dependency heatmaps beta_{i,j}, 6L-6L, d_model 512, one panel per scheme and stack -> dependency_6l.{json,png,pdf}
2. encoder output change vs depth, 1..50 layers (2..100 sub-layers), d_model 512, one line per scheme
                                                                                      -> output_change.{json,png,pdf}
3. relative gradient norms per sub-layer, 18L-18L, d_model 512, one line per scheme   -> grad_norms_18l.{json,png,pdf}

All at initialisation with fixed seeds on a batch of 8 random sentences of 10-20 tokens; each scheme's calibration
runs first (Admin's omega profiled with dropout 0.1) and every measurement runs in eval mode. ``--norm`` builds every
scheme with that norm (schemes without norms are left out). ``timings.json`` records the seconds per part; with all
ten schemes the defaults take about 11 minutes on 2 shared CPU cores (see the README).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from transformer_ln.diagnostics import build_model, depth_sweep, gradient_norms, random_batch, residual_dependency
from transformer_ln.diagnostics.cli import write_json
from transformer_ln.plotting import plot_dependency, plot_grad_norms, plot_output_change
from transformer_ln.norms import NORMS
from transformer_ln.residual import SCHEMES
DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 50, 64, 100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-depth", type=int, default=50, help="deepest encoder of the output-change sweep")
    ap.add_argument("--samples", type=int, default=3, help="random perturbations averaged per depth")
    ap.add_argument("--batch-size", type=int, default=8, help="random sentences of up to 20 tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dpi", type=int, default=150, help="resolution of the PNGs (100 for docs/figures)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated schemes (default: all)")
    ap.add_argument("--norm", default="layernorm", choices=list(NORMS), help="the norm of every scheme")
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad:
        ap.error(f"--schemes: unknown {', '.join(bad)}; allowed: {', '.join(SCHEMES)}")
    if args.norm != "layernorm":
        schemes = [s for s in schemes if SCHEMES[s].has_norms]
    kw = {"norm": args.norm}
    batch = random_batch(1000, args.batch_size, 20, seed=args.seed)
    timings: dict[str, float] = {}

    t = time.time()
    betas = {}
    for r in schemes:
        model = build_model(r, 6, n_dec_layers=6, seed=args.seed, batch=batch, **kw)
        betas[r] = residual_dependency(model, batch["src"], batch["tgt_in"])
    write_json({"checkpoint": "init", "layers": "6L-6L", "d_model": 512, "norm": args.norm, "results": betas,
                "diagonal": {r: {s: np.diagonal(b, 1) for s, b in v.items()} for r, v in betas.items()}},
               args.out / "dependency_6l.json")
    plot_dependency(betas, args.out / "dependency_6l", "init, 6L-6L", dpi=args.dpi)
    timings["dependency_6l"] = time.time() - t

    t = time.time()
    depths = [d for d in DEPTHS if d <= args.max_depth]
    sweep = depth_sweep(schemes, depths, d_model=512, batch_size=args.batch_size, n_samples=args.samples,
                        seed=args.seed, **kw)
    write_json(sweep, args.out / "output_change.json")
    plot_output_change(sweep, args.out / "output_change", dpi=args.dpi)
    timings["output_change"] = time.time() - t

    t = time.time()
    norms = {}
    for r in schemes:
        model = build_model(r, 18, n_dec_layers=18, seed=args.seed, batch=batch, **kw)
        norms[r] = gradient_norms(model, batch["src"], batch["tgt_in"], batch["tgt_out"])
        del model
    write_json({"checkpoint": "init", "layers": "18L-18L", "d_model": 512, "norm": args.norm, "results": norms},
               args.out / "grad_norms_18l.json")
    plot_grad_norms(norms, args.out / "grad_norms_18l", "init, 18L-18L", dpi=args.dpi)
    timings["grad_norms_18l"] = time.time() - t
    timings["total"] = sum(timings.values())
    write_json(timings, args.out / "timings.json")

    print("diagonal beta_{i,i}, encoder 6L:")
    for r in schemes:
        print(f"  {r:13s}", np.round(np.diagonal(betas[r]["encoder"], 1), 2))
    print("encoder output change (sub-layers: value):")
    for r, res in sweep["results"].items():
        pts = ", ".join(f"{n}: {v:.3g}" for n, v in zip(res["sublayers"], res["output_change"]))
        f = res["fit"]
        print(f"  {r:13s} {pts}\n                better fit {f['better']} (R^2 linear {f['linear']['r2']:.3f}, "
              f"log {f['log']['r2']:.3f}), deepest/shallowest {res['ratio']:.1f}")
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


if __name__ == "__main__":
    main()
