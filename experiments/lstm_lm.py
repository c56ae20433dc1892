"""LSTM against LN-LSTM language models (Ba et al. 2016's claim: layer normalization converges faster).

Runs norm x lr x seed one after another in this process (one thread each), skips runs whose ``summary.json``
exists (rerun to resume), then writes the table, CSV and figures of everything finished under ``--out``:

    OMP_NUM_THREADS=1 python experiments/lstm_lm.py                       # Multi30k English, the committed study
    python experiments/lstm_lm.py --source synthetic --out runs/lm_smoke --seeds 1 --max-updates 100

Multi30k's train.en / val.en are read from ``--m30k`` (default ../shared/data/multi30k) and never copied.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformer_ln.recurrent import study as ln_study  # noqa: E402
from transformer_ln.atomic import write_text  # noqa: E402
from transformer_ln.errors import UserError  # noqa: E402
from transformer_ln.recurrent.lm import LMConfig, load_texts, train_lm  # noqa: E402

NORMS = {"layernorm": "layernorm", "none": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("experiments/results/seeds_ln"))
    ap.add_argument("--source", choices=("files", "synthetic"), default="files")
    ap.add_argument("--m30k", type=Path, default=Path("../shared/data/multi30k"))
    ap.add_argument("--synthetic-size", type=int, default=5000, help="training sentences of the built-in corpus")
    ap.add_argument("--norms", nargs="+", choices=tuple(NORMS), default=["none", "layernorm"])
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 5e-3])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--max-updates", type=int, default=800)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--emb", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs_dir = args.out / "lm"
    base = dict(source=args.source, synthetic_train_size=args.synthetic_size, emb_size=args.emb, hidden_size=args.hidden, batch_size=args.batch,
                max_updates=args.max_updates, eval_every=args.eval_every)
    if args.source == "files":
        base.update(train_path=str(args.m30k / "train.en"), valid_path=str(args.m30k / "val.en"))
    try:
        texts = load_texts(LMConfig(**base))
        grid = [(seed, lr, NORMS[n]) for seed in args.seeds for lr in args.lrs for n in args.norms]
        for i, (seed, lr, norm) in enumerate(grid, 1):
            run = runs_dir / ln_study.lm_run_name(norm, lr, seed)
            if (run / "summary.json").is_file():
                print(f"[{i}/{len(grid)}] {run.name}: finished, skipped")
                continue
            t0 = time.perf_counter()
            s = train_lm(LMConfig(**base, norm=norm, lr=lr, seed=seed), out_dir=run, progress=True,
                         texts=texts if args.source == "files" else None)
            print(f"[{i}/{len(grid)}] {run.name}: {s['status']}, valid ppl {s['final_valid_ppl']:.1f} after "
                  f"{s['updates']} updates, {time.perf_counter() - t0:.0f} s", flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = ln_study.read_lm_runs(runs_dir)
    table, rows = ln_study.lm_table(runs)
    write_text(args.out / "lm_results.md", table)
    ln_study.write_csv(rows, args.out / "lm_results.csv")
    what = "Multi30k English" if args.source == "files" else "built-in corpus"
    ln_study.plot_lm_curves(runs, args.out / "lstm_vs_lnlstm_valid_ppl.png",
                            f"{what}: LSTM vs LN-LSTM LM, emb {args.emb}, hidden {args.hidden}, batch {args.batch}")
    ln_study.plot_lm_gap(runs, args.out / "lstm_vs_lnlstm_ppl_ratio.png", f"{what}: LSTM ppl / LN-LSTM ppl")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
