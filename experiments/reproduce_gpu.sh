#!/usr/bin/env bash
# GPU-scale study on Multi30k De->En (bf16 where supported): 6L-6L for the three schemes with two seeds, and 18L-18L
# Post-LN vs Admin at the paper's peak lr 1e-3. The same command runs on any CUDA machine:
#   bash experiments/reproduce_gpu.sh [OUT_DIR] [6|18|all|lr]
# lr (not part of all: 40 runs of a 71M model, a few GPU hours): issue 25's learning-rate-sensitivity sweep on
# the Mix-LN paper's smallest LLaMA (experiments/configs/lm_71m_llama.yaml); TEXT=dir with train/valid/test .txt
# (e.g. a C4 sample) for its 32000-token vocabulary, else Multi30k's English side.
set -euo pipefail
OUT=${1:-runs/gpu_study}
WHICH=${2:-all}
D=${M30K:-../shared/data/multi30k}   # where Multi30k lies (read by path, never copied into the repository)
COMMON=(train.save_epochs=false train.keep_last=1 data.train_src=$D/train.de data.train_tgt=$D/train.en
        data.valid_src=$D/val.de data.valid_tgt=$D/val.en
        data.test_src=$D/test_2016_flickr.de data.test_tgt=$D/test_2016_flickr.en)
if [[ $WHICH == 6 || $WHICH == all ]]; then
  "${PYTHON:-python}" experiments/sweep.py experiments/configs/multi30k_6l.yaml --out "$OUT/multi30k_6l" --no-plots \
    --grid residual=post_ln,pre_ln,admin depth=6 lr=1e-3 warmup=1000 seed=1,2 -- "${COMMON[@]}"
fi
if [[ $WHICH == 18 || $WHICH == all ]]; then
  "${PYTHON:-python}" experiments/sweep.py experiments/configs/multi30k_18l.yaml --out "$OUT/multi30k_18l" --no-plots \
    --grid residual=post_ln,admin depth=18 lr=1e-3 warmup=1000 seed=1 -- "${COMMON[@]}"
fi
if [[ $WHICH == lr ]]; then
  TEXT_ARGS=()
  [[ -n ${TEXT:-} ]] && TEXT_ARGS=(data.train_text=$TEXT/train.txt data.valid_text=$TEXT/valid.txt data.test_text=$TEXT/test.txt)
  "${PYTHON:-python}" experiments/lr_sensitivity.py experiments/configs/lm_71m_llama.yaml --out "$OUT/lr_71m" \
    --schemes pre_ln post_ln sandwich lns mix_ln hybridnorm pre_ln+qk_norm pre_ln+z_loss --depths 12 \
    --lrs 3e-4,1e-3,3e-3,1e-2,3e-2 --seeds 1 --warmup 200 -- "${TEXT_ARGS[@]}"
fi
