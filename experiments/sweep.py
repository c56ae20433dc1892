#!/usr/bin/env python
"""Run a grid of training runs and collect results.md / results.csv and the plots (thin over transformer_ln.training.sweep).

  python experiments/sweep.py experiments/configs/cpu_synthetic.yaml --out runs/sweep \
      --grid residual=post_ln,pre_ln,admin depth=3,12 lr=2e-3 warmup=100 seed=1 -- train.max_updates=300
  python experiments/sweep.py CONFIG --out DIR --grid ... --launcher "accelerate launch --num_processes 2"
Finished runs (those with summary.json) are skipped, so rerunning resumes the sweep.
"""
import argparse
import shlex
import sys
from pathlib import Path

from transformer_ln.cli import run_command
from transformer_ln.model.schemes import SCHEMES
from transformer_ln.training.sweep import collect, parse_grid, plot_sweep, run_grid


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="base YAML config (default: the built-in demo settings)")
    p.add_argument("--out", required=True, help="sweep folder: one run directory per grid point")
    p.add_argument("--grid", nargs="+", default=[], metavar="AXIS=V1,V2",
                   help="axes residual, depth, lr, warmup, seed (defaults: every registered scheme, 3, 2e-3, 300, 1)")
    p.add_argument("--launcher", default=None, help='e.g. "accelerate launch --num_processes 2" (default: python)')
    p.add_argument("--cpu", action="store_true", help="pass --cpu to every run")
    p.add_argument("--no-plots", action="store_true", help="skip the curve and dependency plots")
    args, rest = p.parse_known_args(argv)
    args.overrides = [r for r in rest if r != "--"]  # section.key=value for every run, after --
    bad = [r for r in args.overrides if "=" not in r]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like section.key=value)")
    defaults = {"residual": list(SCHEMES), "depth": [3], "lr": [2e-3], "warmup": [300], "seed": [1]}
    points = parse_grid(args.grid, defaults)
    out = Path(args.out)
    dirs = run_grid(points, out, args.config, args.overrides, args.cpu,
                    shlex.split(args.launcher) if args.launcher else None)
    rows = collect(out)
    print((out / "results.md").read_text())
    if not args.no_plots and rows:
        for path in plot_sweep(out, dirs):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
