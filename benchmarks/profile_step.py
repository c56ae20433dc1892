"""Where a training step's time goes: torch.profiler's top operators for one model and shape.

Why: the ratio table says how fast; this says what to fix (kernel time vs. host overhead, which kernels).

    python benchmarks/profile_step.py --device cuda --shape base --model post_ln nn.Transformer
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (BASELINE, SCHEMES, SHAPES, TorchTransformer, Trainer, check_device,  # noqa: E402
                        make_batch, our_model)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="cpu", choices=list(SHAPES))
    p.add_argument("--model", nargs="+", default=["post_ln", BASELINE], choices=[*SCHEMES, BASELINE])
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args(argv)
    device = check_device(args.device)
    shape = SHAPES[args.shape]
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name in args.model:
        torch.manual_seed(0)
        model = TorchTransformer(shape, 0.1) if name == BASELINE else our_model(shape, name, 0.1)
        t = Trainer(name, model, device, cuda)
        batch = make_batch(shape, device)
        n_tokens = batch[2].numel()
        for _ in range(3):
            t.step(batch, n_tokens)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            for _ in range(2):
                t.step(batch, n_tokens)
            if cuda:
                torch.cuda.synchronize()
        key = "device_time_total" if cuda else "self_cpu_time_total"
        print(f"===== {name}, shape {args.shape}, 2 steps")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
        del t, model
    return 0


if __name__ == "__main__":
    sys.exit(main())
