#!/usr/bin/env bash
# Every GPU figure of benchmarks/RESULTS.md in one go (stages: check eager decode profile compile fsdp).
# Usage: OUT=dir bash benchmarks/run_gpu.sh [STAGE...]; each stage has its own time limit.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
stages=${*:-check eager decode profile compile fsdp}
for s in $stages; do
  echo "=== $s $(date +%T)"
  case $s in
    check) nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
           python3 -c "import torch; print(torch.__version__, torch.version.cuda)"
           timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_search.py tests/test_fast_paths.py \
             tests/test_model.py 2>&1 | tail -3 ;;
    eager) timeout 150 python3 benchmarks/throughput.py --device cuda --shape base big base18 --steps 10 \
             --json "$OUT/eager.json" ;;
    decode) timeout 120 python3 benchmarks/decode.py --device cuda --sentences 256 --json "$OUT/decode.json" ;;
    profile) timeout 90 python3 benchmarks/profile_step.py --device cuda --shape base --model post_ln nn.Transformer \
             --rows 30 > "$OUT/profile_base.txt" 2>&1; tail -5 "$OUT/profile_base.txt" ;;
    compile) timeout 200 python3 benchmarks/throughput.py --device cuda --shape base --steps 10 --compile \
               --json "$OUT/compile_base.json"
             timeout 200 python3 benchmarks/throughput.py --device cuda --shape big --steps 10 --compile \
               --json "$OUT/compile_big.json" ;;
    fsdp) # FSDP2 on GPU with bf16 and NCCL (one process: the code path, not the scaling), then resume
          timeout 150 accelerate launch --config_file experiments/accelerate/fsdp.yaml --num_processes 1 \
            -m transformer_ln.train --demo train.out_dir="$OUT/fsdp_run" train.max_updates=40 train.save_every=20 \
            train.bleu_at_end=false --overwrite > "$OUT/fsdp.log" 2>&1
          timeout 90 accelerate launch --config_file experiments/accelerate/fsdp.yaml --num_processes 1 \
            -m transformer_ln.train --resume "$OUT/fsdp_run" train.max_updates=60 >> "$OUT/fsdp.log" 2>&1
          grep -E "FSDP2|resumed|error" "$OUT/fsdp.log"; tail -c 600 "$OUT/fsdp_run/summary.json" ;;
  esac
done
echo "=== done $(date +%T)"
