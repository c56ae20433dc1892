#!/usr/bin/env python
"""Run a grid of training runs and collect results.md / results.csv and the plots: ``transformer-ln sweep``
(``transformer_ln.training.sweep.main``), kept as a script for older command lines.

  python experiments/sweep.py experiments/configs/cpu_synthetic.yaml --out runs/sweep \
      --grid residual=post_ln,pre_ln,admin depth=3,12 lr=2e-3 warmup=100 seed=1 -- train.max_updates=300
  python experiments/sweep.py CONFIG --out DIR --grid ... --launcher "accelerate launch --num_processes 2"
Finished runs (those with summary.json) are skipped, so rerunning resumes the sweep.
"""
import sys

from transformer_ln.cli import run_command
from transformer_ln.training.sweep import main

if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
