"""Training-step throughput of our encoder-decoder per residual scheme against ``torch.nn.Transformer``.

Why this design: a ratio measured in one process, with the models' steps interleaved, survives a noisy shared
machine far better than absolute times taken minutes apart. Every model does the full step a trainer does: forward,
label-smoothed cross-entropy over the tied vocabulary projection, backward, AdamW step (fused on CUDA). On CUDA the
step runs under bf16 autocast, optionally compiled (``--compile``), and the model FLOP utilization is the FLOPs that
``torch.utils.flop_counter.FlopCounterMode`` counts for one step over a bf16 matrix-product peak measured here.

Tokens per second count source plus target tokens. ``nn.Transformer`` gets what ours has: token embeddings scaled by
sqrt(d), sinusoidal positions, embedding dropout, a source padding mask, a causal target mask, the output projection
tied to the (shared) embedding; it keeps its final LayerNorm per stack (two small LayerNorms, irrelevant to timing).
Dropout is 0.1 wherever ``nn.Transformer`` applies it (residual, attention weights, FFN activation).

    python benchmarks/throughput.py --device cpu --steps 10
    python benchmarks/throughput.py --device cuda --shape base big --compile --json out.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_ln.config import ModelConfig  # noqa: E402
from transformer_ln.model.layers import sinusoidal_table  # noqa: E402
from transformer_ln.model.seq2seq import Seq2SeqTransformer  # noqa: E402
from transformer_ln.model.schemes import SCHEMES as REGISTRY  # noqa: E402

PAD = 0
SCHEMES = tuple(REGISTRY)
BASELINE = "nn.Transformer"


@dataclass(frozen=True)
class Shape:
    d_model: int
    n_heads: int
    d_ff: int
    layers: int
    batch: int
    src_len: int
    tgt_len: int
    vocab: int

    @property
    def tokens(self) -> int:
        return self.batch * (self.src_len + self.tgt_len)


SHAPES = {
    # the CPU shape of issue 7; heads and d_ff are the base model's ratios (d_head 64, d_ff = 4 d_model)
    "cpu": Shape(256, 4, 1024, 6, 32, 32, 32, 8000),
    "base": Shape(512, 8, 2048, 6, 128, 64, 64, 32000),
    "big": Shape(1024, 16, 4096, 6, 128, 64, 64, 32000),
    "base18": Shape(512, 8, 2048, 18, 128, 64, 64, 32000),
}


def our_model(shape: Shape, residual: str, dropout: float) -> Seq2SeqTransformer:
    cfg = ModelConfig(src_vocab_size=shape.vocab, tgt_vocab_size=shape.vocab, d_model=shape.d_model,
                      n_heads=shape.n_heads, d_ff=shape.d_ff, n_enc_layers=shape.layers, n_dec_layers=shape.layers,
                      dropout=dropout, attn_dropout=dropout, act_dropout=dropout, residual=residual,
                      admin_omega="O(logn)" if residual == "admin" else "profile", share_embeddings=True,
                      max_positions=max(shape.src_len, shape.tgt_len) + 2, pad_id=PAD)
    return Seq2SeqTransformer(cfg)


class TorchTransformer(nn.Module):
    """``nn.Transformer`` with the same embeddings, positions, masks and tied output projection as ours."""

    def __init__(self, shape: Shape, dropout: float):
        super().__init__()
        d = shape.d_model
        self.embed = nn.Embedding(shape.vocab, d, padding_idx=PAD)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        self.scale = math.sqrt(d)
        self.register_buffer("positions", sinusoidal_table(max(shape.src_len, shape.tgt_len) + 2, d),
                             persistent=False)
        self.dropout = nn.Dropout(dropout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.core = nn.Transformer(d, shape.n_heads, shape.layers, shape.layers, shape.d_ff, dropout,
                                       batch_first=True)
        self._causal: dict[tuple, torch.Tensor] = {}

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.embed(tokens) * self.scale + self.positions[:tokens.shape[1]])

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        T = tgt_in.shape[1]
        key = (T, src.device)
        if key not in self._causal:  # built once per length, as a trainer would
            self._causal[key] = nn.Transformer.generate_square_subsequent_mask(T, device=src.device)
        pad = src.eq(PAD)
        y = self.core(self._embed(src), self._embed(tgt_in), tgt_mask=self._causal[key], src_key_padding_mask=pad,
                      memory_key_padding_mask=pad, tgt_is_causal=True)
        return F.linear(y, self.embed.weight)


def make_batch(shape: Shape, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random tokens (ids 4..V-1), full length: a length-bucketed batch has next to no padding."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, shape.vocab, (shape.batch, shape.src_len), generator=g)
    tgt = torch.randint(4, shape.vocab, (shape.batch, shape.tgt_len + 1), generator=g)
    return src.to(device), tgt[:, :-1].contiguous().to(device), tgt[:, 1:].contiguous().to(device)


class Trainer:
    """One model, its optimizer and its training step; ``step()`` never synchronizes with the device."""

    def __init__(self, name: str, model: nn.Module, device: torch.device, amp: bool):
        self.name, self.device, self.amp = name, device, amp
        self.model = model.to(device).train()
        # fused AdamW (one pass over the parameters; CUDA and, since torch 2.4, the CPU) for every model alike
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8,
                                     weight_decay=0.0, fused=True)
        self.forward = self.model

    def compile(self, mode: str | None) -> None:
        """``full``: torch.compile the model; ``regional``: each layer (see ``compile_layers``); None: eager."""
        if mode == "full":
            self.forward = torch.compile(self.model)
        elif mode == "regional":
            compile_layers(self.model)

    def loss(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor, n_tokens: int) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.forward(src, tgt_in)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), tgt_out.view(-1), ignore_index=PAD,
                               label_smoothing=0.1, reduction="sum") / n_tokens

    def step(self, batch: tuple[torch.Tensor, ...], n_tokens: int) -> torch.Tensor:
        loss = self.loss(*batch, n_tokens)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def compile_layers(model: nn.Module) -> None:
    """Regional compilation: every encoder/decoder layer compiled in place (identical layers share one graph).

    Why: compiling each layer costs a fraction of compiling the whole model and keeps most of the gain; the same
    is applied to ``nn.Transformer`` so that the comparison stays like for like.
    """
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            for layer in m:
                layer.compile()


def count_flops(trainer: Trainer, batch: tuple[torch.Tensor, ...], n_tokens: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.loss(*batch, n_tokens).backward()
    trainer.opt.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_peak(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Best measured bf16 matrix-product rate (FLOP/s) on random data: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n ** 3 / statistics.median(times)


class Timer:
    """Per-step wall time: CUDA events on the GPU (no host sync between steps), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, start) -> None:
        self.marks.append((start, self.start()))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        return [b - a for a, b in self.marks]


def bench_shape(shape_name: str, args, device: torch.device, peak: float | None) -> dict:
    shape = SHAPES[shape_name]
    amp = device.type == "cuda"
    names = [BASELINE, *args.schemes]
    trainers = []
    for i, name in enumerate(names):
        torch.manual_seed(i)
        model = TorchTransformer(shape, args.dropout) if name == BASELINE else our_model(shape, name, args.dropout)
        trainers.append(Trainer(name, model, device, amp))
    batch = make_batch(shape, device)
    n_tokens = batch[2].ne(PAD).sum().item()
    flops = {t.name: count_flops(t, batch, n_tokens) for t in trainers} if peak else {}  # eager: same math
    for t in trainers:
        t.compile(args.compile)
    t0 = time.perf_counter()
    for _ in range(args.warmup):  # also compiles
        for t in trainers:
            t.step(batch, n_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    timers = {t.name: Timer(device) for t in trainers}
    host = {t.name: [] for t in trainers}  # time the host spends issuing a step: near the step time = launch-bound
    losses = {}
    for i in range(args.steps):
        order = trainers if i % 2 == 0 else trainers[::-1]  # alternate so no model always follows the same one
        for t in order:
            timer = timers[t.name]
            s = timer.start()
            h = time.perf_counter()
            losses[t.name] = t.step(batch, n_tokens)
            host[t.name].append(time.perf_counter() - h)
            timer.stop(s)
    rows = {}
    for t in trainers:
        secs = timers[t.name].seconds()
        med = statistics.median(secs)
        rows[t.name] = dict(ms_per_step=med * 1e3, tokens_per_s=shape.tokens / med, loss=float(losses[t.name]),
                            host_ms=statistics.median(host[t.name]) * 1e3,
                            ms_all=[s * 1e3 for s in secs], flops_per_step=flops.get(t.name),
                            mfu=flops[t.name] / med / peak if peak else None)
    base = rows[BASELINE]["ms_per_step"]
    for r in rows.values():
        r["ratio"] = base / r["ms_per_step"]
    del trainers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(shape=shape_name, **dataclasses.asdict(shape), compile=args.compile, warmup_s=warmup_s,
                models=rows)


def print_table(result: dict, file=sys.stdout) -> None:
    mfu = any(r["mfu"] is not None for r in result["models"].values())
    print(f"\nshape {result['shape']}: d_model {result['d_model']}, {result['layers']}+{result['layers']} layers, "
          f"{result['n_heads']} heads, d_ff {result['d_ff']}, batch {result['batch']} x "
          f"{result['src_len']}/{result['tgt_len']}, vocab {result['vocab']}, compile {result['compile']}", file=file)
    print(f"{'model':<16}{'ms/step':>10}{'tokens/s':>12}{'ratio':>8}" + (f"{'MFU':>8}" if mfu else ""), file=file)
    for name, r in result["models"].items():
        line = f"{name:<16}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12,.0f}{r['ratio']:>7.2f}x"
        if mfu:
            line += f"{100 * r['mfu']:>7.1f}%"
        print(line, file=file)


def check_device(name: str) -> torch.device:
    """The device named on the command line, or exit with a message saying what this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"error: --device {name!r} is not a device name; use cpu or cuda (cuda:N for one GPU)")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name}: this PyTorch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"error: --device {name}: only cpu and cuda are benchmarked")
    return device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", nargs="+", default=None, choices=list(SHAPES),
                   help="default: cpu on the CPU, base big base18 on CUDA")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    p.add_argument("--compile", nargs="?", const="regional", default=None, choices=["regional", "full"],
                   help="torch.compile every model: each layer (regional, default) or the whole model (full)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps} and {args.warmup})")
    device = check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shape or (["cpu"] if device.type == "cpu" else ["base", "big", "base18"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_peak(device) if device.type == "cuda" else None
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                or platform.machine(), threads=torch.get_num_threads(), peak_bf16_flops=peak,
                command=" ".join(sys.argv), results=[])
    print(f"{info['device']}, torch {info['torch']}, {info['threads']} threads"
          + (f", measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))
    for name in shapes:
        result = bench_shape(name, args, device, peak)
        info["results"].append(result)
        print_table(result)
        if args.json:
            args.json.write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
