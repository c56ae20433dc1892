"""BatchNorm against LayerNorm in the Transformer across batch sizes (Ba et al. 2016's claim: LN is robust to the
batch size, BatchNorm degrades at small batches and differs between training and test).

One recipe (``experiments/configs/cpu_synthetic.yaml``, 3L-3L Post-LN by default) trained at every
``train.max_tokens`` with ``model.norm=layernorm`` and ``batchnorm``, through ``transformer_ln.training.sweep`` (finished runs
are skipped: rerun to resume). Then, per run: best valid nll, test BLEU, and the valid nll of the best checkpoint
with each batch's own statistics instead of the running averages (BatchNorm's train/eval gap; zero for LN).

    OMP_NUM_THREADS=1 python experiments/batchnorm_vs_layernorm.py      # -> experiments/results/seeds_ln/bn/...
    python experiments/batchnorm_vs_layernorm.py --tokens 256 1024 --updates 50 --out runs/bn_smoke
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_ln.recurrent import study as ln_study  # noqa: E402
from transformer_ln.atomic import write_text  # noqa: E402
from transformer_ln.cli import run_command  # noqa: E402
from transformer_ln.training.sweep import Point, run_grid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/results/seeds_ln"))
    ap.add_argument("--config", default=str(ROOT / "experiments/configs/cpu_synthetic.yaml"))
    ap.add_argument("--norms", nargs="+", default=["layernorm", "batchnorm"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[128, 512, 2048], help="train.max_tokens values")
    ap.add_argument("--residual", default="post_ln")
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--updates", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--beam", type=int, default=1, help="beam of the test BLEU (1: greedy, faster)")
    args, rest = ap.parse_known_args(argv)
    extra = [r for r in rest if r != "--"]  # further section.key=value overrides for every run
    root = args.out / "bn"
    point = Point(args.residual, args.depth, args.lr, args.warmup, args.seed)
    for tokens in args.tokens:
        for norm in args.norms:
            overrides = [f"model.norm={norm}", f"train.max_tokens={tokens}", f"train.max_updates={args.updates}",
                         f"train.valid_every={max(args.updates // 8, 1)}", f"train.beam={args.beam}", *extra]
            print(f"== {norm}, max_tokens {tokens}", flush=True)
            run_grid([point], root / f"{norm}-tok{tokens}", args.config, overrides, cpu=True)
    rows = ln_study.read_norm_runs(root)
    for r in rows:
        if r["status"] == "completed":
            two = ln_study.valid_nll_two_ways(r["run"])
            r["valid_nll_batch"], r["gap"] = two["batch"], two["gap"]
    for r in rows:
        r["run"] = str(Path(r["run"]).relative_to(args.out))
    table = ln_study.norm_table(rows)
    write_text(args.out / "bn_results.md", table)
    ln_study.write_csv(rows, args.out / "bn_results.csv")
    for r in rows:
        r["run"] = str(args.out / r["run"])
    what = f"{args.residual} {args.depth}L-{args.depth}L, built-in corpus, lr {args.lr:g}, {args.updates} updates"
    ln_study.plot_norm_vs_batch(rows, args.out / "batchnorm_vs_layernorm_vs_batch_size.png", what)
    ln_study.plot_norm_curves(rows, args.out / "batchnorm_vs_layernorm_valid_curves.png", what)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
