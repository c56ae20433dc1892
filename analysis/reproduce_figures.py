"""Rebuild every figure and number of the README's analysis section on a CPU.

    python analysis/reproduce_figures.py --out docs/figures --dpi 100      # what the README shows

1. dependency heatmaps beta_{i,j}, 6L-6L, d_model 512, one panel per scheme and stack -> dependency_6l.{json,png,pdf}
2. encoder output change vs depth (1..50 layers, 2..100 sub-layers), d_model 256, Post-LN / Pre-LN / Admin, 5 seeds,
   under three definitions measured on the same models: ours, the reference's (Transformer-Clinic's
   plot_stability) and the reference's in eval mode (no dropout noise) -> output_change.{json,png,pdf}
3. relative gradient norms per sub-layer, 18L-18L, d_model 512, one line per scheme   -> grad_norms_18l.{json,png,pdf}
4. Admin's profiled omega on 6L-6L, d_model 512, 5 seeds: ours (pads skipped) and the reference's recursion (pads
   counted), beside the reference's published profile (a 100L-100L WMT'14 model)         -> admin_profile.json
5. only with ``--scheme-sweep`` (slow: about 35 minutes on 2 loaded cores): every scheme's encoder output change under
   our definition, d_model 512, one seed, 3 perturbations per depth  -> output_change_schemes.{json,png,pdf}

All at initialisation with fixed seeds on a batch of 8 random sentences of 10-20 tokens; each scheme's calibration
runs first (Admin's omega profiled with dropout 0.1). ``--norm`` builds every scheme with that norm (schemes without
norms are left out). ``timings.json`` records the seconds per part, the torch threads and the machine's load.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from transformer_ln.model.admin import admin_init
from transformer_ln.diagnostics import build_model, depth_sweep, gradient_norms, random_batch, residual_dependency
from transformer_ln.diagnostics.cli import write_json
from transformer_ln.diagnostics.output_change import definition
from transformer_ln.model.norms import NORMS
from transformer_ln.diagnostics.plotting import plot_dependency, plot_grad_norms, plot_output_change
from transformer_ln.diagnostics.stats import columns_ci95
from transformer_ln.model.schemes import SCHEMES

DEPTHS = (1, 2, 4, 8, 16, 32, 50, 64, 100)
SCHEME_SWEEP_DEPTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 50)
DEFINITIONS = {"ours": definition("ours"), "reference": definition("reference"),
               "reference_eval": definition("reference", mode="eval")}
# Transformer-Clinic's example profile (admin-torch example/profile.ratio.init): a 100L-100L WMT'14 En-De model,
# base width, dropout 0.1, 4096-token batch; its first 12 encoder lines (the profile is sequential).
REFERENCE_100L_ENCODER = (1.000, 1.319, 1.455, 1.512, 1.643, 1.696, 1.810, 1.867, 1.971, 2.028, 2.121, 2.173)


def admin_profiles(seeds: list[int], batch: dict, **kw) -> dict:
    """omega_1..12 of a 6L-6L encoder: our profile and the reference's recursion (pads counted), per seed."""
    out: dict = {"ours_pads_skipped": [], "reference_recursion_pads_counted": []}
    for seed in seeds:
        model = build_model("admin", 6, n_dec_layers=6, seed=seed, batch=batch, **kw)
        for key, pads in (("ours_pads_skipped", False), ("reference_recursion_pads_counted", True)):
            out[key].append(admin_init(model, batch["src"], batch["tgt_in"], seed=seed, count_padding=pads)["encoder"])
    summary = {k: dict(zip(("mean", "ci95"), columns_ci95(v)), per_seed=v) for k, v in out.items()}
    summary["reference_100L_first_12"] = {"values": list(REFERENCE_100L_ENCODER),
                                          "model": "100L-100L WMT'14 En-De (Transformer-Clinic / admin-torch "
                                                   "example/profile.ratio.init), 4096-token batch"}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-depth", type=int, default=50, help="deepest encoder of the output-change sweep")
    ap.add_argument("--seeds", type=int, default=5, help="seeds of the output-change sweep and the Admin profile")
    ap.add_argument("--sweep-d-model", type=int, default=256, help="width of the output-change sweep")
    ap.add_argument("--sweep-schemes", default="post_ln,pre_ln,admin", help="schemes of the output-change sweep")
    ap.add_argument("--batch-size", type=int, default=8, help="random sentences of up to 20 tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dpi", type=int, default=150, help="resolution of the PNGs (100 for docs/figures)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="schemes of the dependency and gradient figures")
    ap.add_argument("--norm", default="layernorm", choices=list(NORMS), help="the norm of every scheme")
    ap.add_argument("--scheme-sweep", action="store_true", help="also sweep every scheme at d_model 512 (slow)")
    args = ap.parse_args()
    schemes = [s for s in args.schemes.split(",") if s]
    sweep_schemes = [s for s in args.sweep_schemes.split(",") if s]
    bad = [s for s in schemes + sweep_schemes if s not in SCHEMES]
    if bad:
        ap.error(f"--schemes/--sweep-schemes: unknown {', '.join(bad)}; allowed: {', '.join(SCHEMES)}")
    if args.norm != "layernorm":
        schemes = [s for s in schemes if SCHEMES[s].has_norms]
        sweep_schemes = [s for s in sweep_schemes if SCHEMES[s].has_norms]
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
    d = args.sweep_d_model
    sweeps = depth_sweep(sweep_schemes, depths, d_model=d, n_heads=max(1, d // 64), batch_size=args.batch_size,
                         seed=args.seed, seeds=args.seeds, definition=list(DEFINITIONS.values()), **kw)
    write_json(dict(zip(DEFINITIONS, sweeps)), args.out / "output_change.json")
    plot_output_change(sweeps, args.out / "output_change", dpi=args.dpi)
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

    t = time.time()
    profile = admin_profiles([args.seed + k for k in range(args.seeds)], batch, **kw)
    write_json(profile, args.out / "admin_profile.json")
    timings["admin_profile"] = time.time() - t
    if args.scheme_sweep:
        t = time.time()
        every = depth_sweep(schemes, [d for d in SCHEME_SWEEP_DEPTHS if d <= args.max_depth], d_model=512,
                            batch_size=args.batch_size, n_samples=3, seed=args.seed, **kw)
        write_json(every, args.out / "output_change_schemes.json")
        plot_output_change(every, args.out / "output_change_schemes", dpi=args.dpi)
        timings["output_change_schemes"] = time.time() - t
    timings["total"] = sum(timings.values())
    write_json({**timings, "torch_threads": torch.get_num_threads(), "load_average_at_end": os.getloadavg()},
               args.out / "timings.json")

    print("diagonal beta_{i,i}, encoder 6L:")
    for r in schemes:
        print(f"  {r:13s}", np.round(np.diagonal(betas[r]["encoder"], 1), 2))
    for name, sweep in zip(DEFINITIONS, sweeps):
        print(f"encoder output change, {name}: {sweep['definition']['text']} (mean of {args.seeds} seeds)")
        for r, res in sweep["results"].items():
            pts = ", ".join(f"{n}: {v:.3g}" for n, v in zip(res["sublayers"], res["output_change"]))
            f, fs = res["fit"], res["fit_seeds"]
            if f is None:  # fewer than three depths: no fit
                print(f"  {r:8s} {pts}")
                continue
            print(f"  {r:8s} {pts}\n           deepest/shallowest {res['ratio']:.2f}; on the means R^2 linear "
                  f"{f['linear']['r2']:.3f}, log {f['log']['r2']:.3f}; per seed R^2 linear "
                  f"{fs['linear']['r2_mean']:.3f}±{fs['linear']['r2_sd']:.3f}, log {fs['log']['r2_mean']:.3f}"
                  f"±{fs['log']['r2_sd']:.3f}; wins linear {fs['wins']['linear']}, log {fs['wins']['log']}")
    print("gradient at the last sub-layer's output / at the first's, 18L-18L:")
    for r in schemes:
        ratio = {}
        for stack in ("encoder", "decoder"):
            v = sorted((x["index"], x["output_grad_norm"]) for x in norms[r].values() if x["stack"] == stack)
            ratio[stack] = round(v[-1][1] / v[0][1], 1) if v and v[0][1] > 0 else float("nan")
        print(f"  {r:13s} encoder {ratio['encoder']}, decoder {ratio['decoder']}")
    print("Admin omega, 6L encoder (mean over seeds):")
    for k in ("ours_pads_skipped", "reference_recursion_pads_counted"):
        print(f"  {k:34s}", np.round(profile[k]["mean"], 3))
    print(f"  {'reference 100L-100L, first 12':34s}", np.array(REFERENCE_100L_ENCODER))
    print("timings (s):", {k: round(v, 1) for k, v in timings.items()}, "threads", torch.get_num_threads())


if __name__ == "__main__":
    main()
