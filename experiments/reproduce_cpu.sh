#!/usr/bin/env bash
# CPU-scale reproduction on the built-in corpus, 2 cores (about 20 minutes): the three schemes at a shallow depth
# (3L-3L, peak lr 2e-3) where all of them train, and at a deep one (12L-12L, peak lr 1e-3) where Post-LN fails to
# learn while Pre-LN and Admin train; 100 warmup updates, 800 updates (experiments/configs/cpu_synthetic.yaml).
#   bash experiments/reproduce_cpu.sh [OUT_DIR]            # add "depth=12 lr=2e-3" grids to see the harsher setting
set -euo pipefail
OUT=${1:-runs/cpu_study}
PY="${PYTHON:-python}"
"$PY" experiments/sweep.py experiments/configs/cpu_synthetic.yaml --out "$OUT" --cpu --no-plots \
  --grid residual=post_ln,pre_ln,admin depth=3 lr=2e-3 warmup=100 seed=1
"$PY" experiments/sweep.py experiments/configs/cpu_synthetic.yaml --out "$OUT" --cpu \
  --grid residual=post_ln,pre_ln,admin depth=12 lr=1e-3 warmup=100 seed=1
