#!/usr/bin/env bash
# CPU-scale reproduction on the built-in corpus, 2 cores: the three schemes at a shallow (3L-3L) and a deep
# (12L-12L) depth with the same aggressive schedule (peak lr 2e-3 after 100 warmup updates, 800 updates).
#   bash experiments/reproduce_cpu.sh [OUT_DIR]
set -euo pipefail
OUT=${1:-runs/cpu_study}
"${PYTHON:-python}" experiments/sweep.py experiments/configs/cpu_synthetic.yaml --out "$OUT" --cpu \
  --grid residual=post_ln,pre_ln,admin depth=3,12 lr=2e-3 warmup=100 seed=1
