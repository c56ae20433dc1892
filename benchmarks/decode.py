"""Beam-search decoding speed: the key/value cache (and, on CUDA, graph replay) against recomputing the prefix.

Why: translation cost is dominated by the decoder's per-step work, and issue 7 asks for cached beam search at least
5x the uncached one at 64 output tokens. A randomly initialised model (no checkpoint needed) rarely emits EOS, so
with ``max_len_a=0, max_len_b=64`` nearly every hypothesis runs the full 64 tokens; the mean output length is
printed. Modes run interleaved, ``--repeats`` times each; the median is reported.

    python benchmarks/decode.py --device cpu
    python benchmarks/decode.py --device cuda --shape base --json decode.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import SHAPES, check_device, our_model  # noqa: E402
from transformer_ln.evaluation.search import beam_search  # noqa: E402

EOS = 2
MODES = {  # name -> beam_search keyword arguments
    "cached": dict(use_cache=True),  # the library's default
    "cached_graph": dict(use_cache=True, cuda_graph=True),  # CUDA only: fixed-shape cache, one graph per step
    "uncached": dict(use_cache=False),
}


def sentences(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """n random source sentences of lo..hi tokens (ids 4..V-1), each ending with EOS."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(torch.cat([torch.randint(4, vocab, (length - 1,), generator=g), torch.tensor([EOS])]))
    return out


def batches(sents: list[torch.Tensor], size: int, device: torch.device) -> list[torch.Tensor]:
    """Right-padded batches of ``size`` sentences, sorted by length as a translation tool would."""
    sents = sorted(sents, key=len)
    out = []
    for i in range(0, len(sents), size):
        chunk = sents[i:i + size]
        b = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
        for j, s in enumerate(chunk):
            b[j, :len(s)] = s
        out.append(b.to(device))
    return out


def translate(model, data: list[torch.Tensor], args, kw: dict) -> tuple[float, list[list[int]]]:
    if data[0].device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    hyps = []
    for src in data:
        hyps += beam_search(model, src, beam=args.beam, max_len_a=0.0, max_len_b=args.out_len, **kw)
    if data[0].device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, hyps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, choices=list(SHAPES), help="default: cpu on the CPU, base on CUDA")
    p.add_argument("--sentences", type=int, default=None, help="default: 16 on the CPU, 512 on CUDA")
    p.add_argument("--batch", type=int, default=None, help="sentences per batch (default: 16 CPU, 128 CUDA)")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--out-len", type=int, default=64)
    p.add_argument("--src-len", type=int, nargs=2, default=(20, 60), metavar=("MIN", "MAX"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on CUDA")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = check_device(args.device)
    cuda = device.type == "cuda"
    shape = SHAPES[args.shape or ("base" if cuda else "cpu")]
    n = args.sentences or (512 if cuda else 16)
    size = args.batch or (128 if cuda else 16)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    torch.manual_seed(0)
    model = our_model_with_positions(shape, args.out_len + 2, args.src_len[1]).to(device, dtype).eval()
    data = batches(sentences(n, *args.src_len, shape.vocab), size, device)
    modes = [m for m in MODES if cuda or m != "cached_graph"]
    for m in modes:  # warm-up of the cached modes (kernels, allocator, graph capture path)
        if m != "uncached":
            translate(model, data[:1], args, MODES[m])
    times: dict[str, list[float]] = {m: [] for m in modes}
    hyps: dict[str, list[list[int]]] = {}
    for r in range(args.repeats):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            t, hyps[m] = translate(model, data, args, MODES[m])
            times[m].append(t)
    rows = {}
    for m in modes:
        med = statistics.median(times[m])
        rows[m] = dict(seconds=med, sentences_per_s=n / med, all_seconds=times[m],
                       mean_out_len=sum(map(len, hyps[m])) / n,
                       same_as_uncached=sum(a == b for a, b in zip(hyps[m], hyps["uncached"])) / n)
    for r in rows.values():
        r["speedup_vs_uncached"] = rows["uncached"]["seconds"] / r["seconds"]
    info = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                device=torch.cuda.get_device_name(device) if cuda else "cpu", threads=torch.get_num_threads(),
                shape=args.shape or ("base" if cuda else "cpu"), dtype=str(dtype), sentences=n, batch=size,
                beam=args.beam, out_len=args.out_len, src_len=list(args.src_len), command=" ".join(sys.argv),
                modes=rows)
    print(f"{info['device']}, torch {info['torch']}: beam {args.beam}, {n} sentences in batches of {size}, "
          f"source {args.src_len[0]}-{args.src_len[1]} tokens, up to {args.out_len} output tokens, "
          f"shape {info['shape']}, {dtype}")
    print(f"{'mode':<14}{'sent/s':>10}{'seconds':>10}{'speedup':>9}{'out len':>9}{'same':>7}")
    for m, r in rows.items():
        print(f"{m:<14}{r['sentences_per_s']:>10.1f}{r['seconds']:>10.2f}{r['speedup_vs_uncached']:>8.2f}x"
              f"{r['mean_out_len']:>9.1f}{100 * r['same_as_uncached']:>6.0f}%")
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
    return 0


def our_model_with_positions(shape, out_positions: int, src_positions: int):
    """Our Post-LN model of ``shape`` with a position table long enough for the sources and the outputs."""
    import dataclasses

    longer = dataclasses.replace(shape, src_len=max(shape.src_len, src_positions, out_positions),
                                 tgt_len=max(shape.tgt_len, out_positions))
    return our_model(longer, "post_ln", 0.0)


if __name__ == "__main__":
    sys.exit(main())
