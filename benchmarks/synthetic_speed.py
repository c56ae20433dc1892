"""How fast the built-in corpus is generated: pairs per second of ``generate_synthetic``.

Why a benchmark and not a test: a speed depends on the machine and on what else runs on it, so it is a figure to
report (README), not a pass/fail assertion. The corpus is the one a default run uses (``data.synthetic_size`` pairs
with ``data.synthetic_seed``); each repeat generates it from scratch in this process, and the median over repeats
is reported, both per wall-clock second and per CPU second of this process.

    python benchmarks/synthetic_speed.py
    python benchmarks/synthetic_speed.py --pairs 20000 --repeats 5 --out synthetic_speed.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_ln.atomic import write_text  # noqa: E402
from transformer_ln.config import DataConfig  # noqa: E402
from transformer_ln.data.synthetic import generate_synthetic  # noqa: E402


def measure(pairs: int, seed: int, repeats: int) -> dict:
    """Median wall and CPU seconds of generating ``pairs`` pairs, and the pairs per second they give."""
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        out = generate_synthetic(pairs, seed)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
        assert len(out) == pairs
    w, c = statistics.median(wall), statistics.median(cpu)
    return {"pairs": pairs, "seed": seed, "repeats": repeats, "wall_s": w, "cpu_s": c,
            "pairs_per_s": pairs / w if w > 0 else float("inf"),
            "pairs_per_cpu_s": pairs / c if c > 0 else float("inf")}


def main(argv: list[str] | None = None) -> int:
    defaults = DataConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=defaults.synthetic_size,
                    help=f"pairs to generate (default {defaults.synthetic_size}, data.synthetic_size)")
    ap.add_argument("--seed", type=int, default=defaults.synthetic_seed,
                    help=f"corpus seed (default {defaults.synthetic_seed}, data.synthetic_seed)")
    ap.add_argument("--repeats", type=int, default=5, help="generations timed; the median is reported (default 5)")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.pairs < 1 or args.repeats < 1:
        ap.error(f"--pairs and --repeats must be >= 1, got {args.pairs} and {args.repeats}")
    r = measure(args.pairs, args.seed, args.repeats)
    print(f"built-in corpus, {r['pairs']} pairs (seed {r['seed']}), median of {r['repeats']}: "
          f"{r['pairs_per_s']:,.0f} pairs/s ({r['wall_s']:.3f} s wall), "
          f"{r['pairs_per_cpu_s']:,.0f} pairs/CPU-s ({r['cpu_s']:.3f} s CPU), Python {platform.python_version()}")
    if args.out is not None:
        meta = {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
                "machine": platform.machine()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps({"meta": meta, "results": r}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
