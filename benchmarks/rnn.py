"""Speed of ``LayerNormLSTM`` against ``torch.nn.LSTM`` and against a textbook LN-LSTM cell loop.

Why these three: ``nn.LSTM`` is what a user would otherwise run (on the CPU a fused oneDNN kernel that admits no
normalization), our ``norm=None`` is the same code as our LN-LSTM without the LNs (the cost of our loop itself), and
the textbook loop (``nn.Linear`` on x_t and on h_{t-1} inside the time loop, ``nn.LayerNorm`` modules) is how an
LN-LSTM is usually written. Each measures forward, a sum over the outputs, and backward (a training step without
the optimizer), and forward alone under ``no_grad``; the models' steps are interleaved in one process so that the
ratios survive a shared machine. Medians over ``--steps`` after ``--warmup``.

    python benchmarks/rnn.py                                  # 30 x 32 sequences, 128 -> 256, 1 thread
    python benchmarks/rnn.py --seq 50 --batch 64 --input 256 --hidden 512 --threads 2 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_ln.atomic import write_text  # noqa: E402
from transformer_ln.recurrent.rnn import LayerNormLSTM  # noqa: E402

BASELINE = "nn.LSTM"


class TextbookLNLSTM(nn.Module):
    """The usual hand-written LN-LSTM: both projections and their LNs inside the time loop, one layer."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ih, self.hh = nn.Linear(input_size, 4 * hidden_size), nn.Linear(hidden_size, 4 * hidden_size, False)
        self.ln_ih, self.ln_hh, self.ln_c = nn.LayerNorm(4 * hidden_size), nn.LayerNorm(4 * hidden_size), \
            nn.LayerNorm(hidden_size)

    def forward(self, x):
        B, H = x.shape[1], self.hh.in_features
        h = c = x.new_zeros(B, H)
        outs = []
        for t in range(x.shape[0]):
            i, f, g, o = (self.ln_ih(self.ih(x[t])) + self.ln_hh(self.hh(h))).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            outs.append(h)
        return torch.stack(outs), (h, c)


def build(input_size: int, hidden_size: int) -> dict[str, nn.Module]:
    return {BASELINE: nn.LSTM(input_size, hidden_size),
            "ours, norm=None": LayerNormLSTM(input_size, hidden_size, norm=None),
            "ours, LN-LSTM": LayerNormLSTM(input_size, hidden_size),
            "textbook LN-LSTM": TextbookLNLSTM(input_size, hidden_size)}


def _train_step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x)[0].sum().backward()


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def measure(models: dict[str, nn.Module], x: torch.Tensor, steps: int, warmup: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for mode, fn in (("train", _train_step), ("forward", _forward)):
        times: dict[str, list[float]] = {name: [] for name in models}
        for i in range(warmup + steps):
            for name, model in models.items():  # interleaved: every model sees the same machine load
                t0 = time.perf_counter()
                fn(model, x)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        base = statistics.median(times[BASELINE])
        for name, ts in times.items():
            ms = statistics.median(ts)
            results.setdefault(name, {})[mode] = {"ms": ms, "ms_all": ts, "nn_lstm_over_this": base / ms}
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=30, help="time steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input", type=int, default=128, help="input size")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    for key in ("seq", "batch", "input", "hidden", "steps", "threads"):
        if getattr(args, key) < 1:
            ap.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build(args.input, args.hidden)
    x = torch.randn(args.seq, args.batch, args.input)
    results = measure(models, x, args.steps, args.warmup)
    shape = f"seq {args.seq} x batch {args.batch}, input {args.input}, hidden {args.hidden}, 1 layer, fp32"
    print(f"{shape}, {args.threads} thread(s), median of {args.steps} after {args.warmup} warm-up, torch "
          f"{torch.__version__}")
    print("| model | train step ms | nn.LSTM / this | forward ms (no_grad) | nn.LSTM / this |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        tr, fw = r["train"], r["forward"]
        print(f"| {name} | {tr['ms']:.1f} | {tr['nn_lstm_over_this']:.2f}x | {fw['ms']:.1f} | "
              f"{fw['nn_lstm_over_this']:.2f}x |")
    if args.json is not None:
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
                "threads": args.threads, "shape": vars(args) | {"json": None}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
