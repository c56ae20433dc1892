"""LayerNorm against BatchNorm (and RMSNorm, GroupNorm, no norm) across batch sizes in a permutation-invariant MLP and
a small CNN on scikit-learn's bundled 8x8 digits (Ba et al. 2016's feed-forward claims).

Runs model x norm x batch size: a learning-rate grid on a tuning seed, then the chosen rate on the reported seeds,
``--jobs`` runs at a time (processes of one thread); each run is a JSON file under ``--out``/ff/ and is read instead
of rerun when it exists (rerun to resume or redraw). Then writes ``ff_results.md``, the CSVs and the figures under
``--out``:

    OMP_NUM_THREADS=1 python experiments/ln_feedforward.py           # the committed study
    python experiments/ln_feedforward.py --out runs/ff_smoke --models mlp --batch-sizes 16 --lrs 1e-3 \\
        --seeds 1 --updates 60

Needs scikit-learn (``pip install -e .[studies]``).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_ln.errors import UserError  # noqa: E402
from transformer_ln.recurrent import ff_study  # noqa: E402
from transformer_ln.recurrent.feedforward import MODELS, load_digits_split  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/results/seeds_ln"))
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=list(ff_study.BATCH_SIZES))
    ap.add_argument("--lrs", nargs="+", type=float, default=list(ff_study.LRS),
                    help="Adam learning rates; with more than one, each row takes the best on validation")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(ff_study.SEEDS))
    ap.add_argument("--tune-seed", type=int, default=ff_study.TUNE_SEED)
    ap.add_argument("--updates", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=128, help="MLP width (two hidden layers)")
    ap.add_argument("--channels", type=int, default=16, help="CNN: this many channels, then twice as many")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one process of one thread each")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        load_digits_split()  # scikit-learn missing: one line now, not one per worker
        reported, tuning = ff_study.run_study(
            args.out / "ff", args.models, args.batch_sizes, args.lrs, args.seeds, args.tune_seed, args.updates,
            args.eval_every, args.jobs, hidden=args.hidden, channels=args.channels)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = ff_study.write_results(reported, tuning, args.out, "sklearn digits")
    print(table)
    print(f"{len(reported) + len(tuning)} runs, {time.perf_counter() - t0:.0f} s (runs read from files included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
