"""Memory per process under DDP and FSDP2: what sharding saves, and what the full-state checkpoint costs.

Runs the same short training (built-in corpus, a d_model-512 model, a few updates, one checkpoint at the end) on
2 CPU processes twice: ``accelerate launch --multi_gpu`` (DDP: every process holds the whole model, its gradients
and both Adam moments) and FSDP2 with ``experiments/accelerate/fsdp.yaml`` through ``tests/fsdp_on_cpu.py`` (the
launch target that lifts accelerate's accelerator-only FSDP check; see its docstring). For each process it reports
the peak RSS (``VmHWM`` from /proc, sampled until the process ends), the bytes of weights, gradients and Adam
moments it holds (16 per parameter value, halved by sharding over 2) and the run's training throughput. The main
process's peak includes the checkpoint, where the whole model and optimizer are gathered to it.

    python benchmarks/fsdp_memory.py --json fsdp_memory.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.d_model=512", "model.n_heads=8", "model.d_ff=2048", "model.n_enc_layers=4", "model.n_dec_layers=4",
         "model.dropout=0.1", "data.vocab_size=8000", "data.synthetic_size=2000", "train.max_tokens=1024",
         "train.valid_every=0", "train.bleu_at_end=false", "train.log_every=1", "optim.warmup_updates=10"]


def _rank_and_hwm(pid: int) -> tuple[int | None, int | None]:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        hwm = next((int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                    if line.startswith("VmHWM:")), None)
        return rank, hwm
    except (OSError, ValueError):
        return None, None


def _is_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "transformer_ln.train" in cmd or "fsdp_on_cpu.py" in cmd


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def run(cmd: list[str], run_dir: Path, env: dict) -> dict:
    """Launch ``cmd``; peak RSS (MiB) per rank, wall time and tokens/s of the run."""
    t0 = time.time()
    with open(run_dir.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak: dict[int, int] = {}
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                rank, hwm = _rank_and_hwm(pid)
                if rank is not None and hwm is not None and _is_worker(pid):
                    peak[rank] = max(peak.get(rank, 0), hwm)
            time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {run_dir.with_suffix('.log')}")
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"distributed": summary["distributed"], "updates": summary["updates"],
            "peak_rss_mib": {r: round(v / 1024) for r, v in sorted(peak.items())},
            "tokens_per_s": round(sum(r["ntokens"] for r in train[1:]) /
                                  max(sum(r["ntokens"] / r["tokens_per_s"] for r in train[1:]), 1e-9)),
            "wall_s": round(time.time() - t0, 1), "loss": [round(r["loss"], 4) for r in train]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=4, help="training updates per run (default 4)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fsdp_memory_"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    modes = {"ddp": ["--multi_gpu", "-m", "transformer_ln.train"],
             "fsdp": ["--config_file", str(REPO / "experiments" / "accelerate" / "fsdp.yaml"),
                      str(REPO / "tests" / "fsdp_on_cpu.py")]}
    common = [*MODEL, f"train.max_updates={args.updates}", f"data.cache_dir={work / 'cache'}", "--cpu"]
    results = {}
    for name, mode in modes.items():
        run_dir = work / name
        results[name] = run([*launch, *mode, *common, f"train.out_dir={run_dir}"], run_dir, env)
        print(name, json.dumps(results[name]), flush=True)
    from safetensors import safe_open

    with safe_open(str(work / "ddp" / "checkpoints" / f"update_{args.updates:08d}" / "model.safetensors"), "pt") as f:
        results["parameter_values"] = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    n = results["parameter_values"]  # float32 weight, gradient and two Adam moments per value
    results["ddp"]["state_mib_per_process"] = round(16 * n / 2**20)
    results["fsdp"]["state_mib_per_process"] = round(16 * n / 2 / 2**20)
    results["same_losses"] = results["ddp"]["loss"] == results["fsdp"]["loss"]
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
