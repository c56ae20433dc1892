#!/usr/bin/env python
"""The learning-rate-sensitivity sweep on the decoder-only model (thin over transformer_ln.training.lr_sweep,
lr_study and diagnostics.lr_plots): schemes x depths x learning rates x seeds, then the tables (lr_results, lrs),
traces of the largest learning rates, depth profiles of each scheme's best run, claims.md and the figures.

  python experiments/lr_sensitivity.py --study --out runs/lr_sensitivity --results experiments/results/lr_sensitivity
  python experiments/lr_sensitivity.py --out runs/my_sweep --schemes pre_ln pre_ln+qk_norm --depths 6 \
      --lrs 1e-3,1e-2,1e-1 --seeds 1,2 --jobs 2 -- model.arch=decoder_only train.max_updates=200
A scheme may carry options: pre_ln+qk_norm, pre_ln+z_loss (1e-4), pre_ln+z_loss=1e-5, pre_ln+model.KEY=VALUE.
Finished runs (summary.json) are skipped and interrupted ones resumed, so rerunning the command resumes the sweep.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from transformer_ln.atomic import write_text
from transformer_ln.cli import run_command
from transformer_ln.diagnostics.depth_stats import jsonable
from transformer_ln.diagnostics.lr_plots import plot_lr_sweep
from transformer_ln.errors import UserError
from transformer_ln.training.lr_study import analyse, claims_markdown
from transformer_ln.training.lr_sweep import check_points, collect_lr, lr_points, run_lr_sweep

# The CPU-scale study (issue 25, part 4): a LLaMA-shaped decoder (RMSNorm, RoPE, SwiGLU), d_model 64, on the
# built-in corpus's text; 100 updates of 256 tokens, Adam (0.9, 0.95), clip 1, 20 warmup updates then inverse sqrt;
# the final loss is on the first 128 validation blocks (8192 tokens); a checkpoint every 20 updates for the traces.
# in this order: the depth claims' schemes first, so an interrupted study has their grids complete
STUDY_SCHEMES = ["pre_ln", "lns", "mix_ln", "sandwich", "pre_ln+qk_norm", "pre_ln+z_loss", "post_ln", "hybridnorm"]
STUDY_LRS = [1e-3, 4e-3, 1.7e-2, 7e-2, 3e-1]  # 1e-3..3e-1, about 4.2x apart
STUDY_GRID = [(6, [1]), (24, [1]), (6, [2])]  # (depth, seeds) in this order: a second seed where affordable
STUDY = ["model.arch=decoder_only", "model.preset=llama", "model.d_model=64", "model.n_heads=4", "model.d_ff=176",
         "model.dropout=0", "model.max_positions=64", "data.block_size=64", "data.synthetic_size=1000",
         "data.vocab_size=500", "optim.label_smoothing=0", "optim.betas=[0.9,0.95]", "optim.clip_norm=1.0",
         "train.max_tokens=256", "train.max_updates=100", "train.max_epochs=0", "train.valid_every=100",
         "train.valid_max_sentences=128",
         "train.save_every=20", "train.keep_last=10", "train.save_epochs=false", "train.bleu_at_end=false",
         "train.log_every=10"]
STUDY_WARMUP = 20


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def prepare_once(config, overrides: list[str]) -> bool:
    """A language model whose text is not prepared yet: tokenize it once for all runs."""
    from transformer_ln.config.run_config import load_run_config

    cfg = load_run_config(config, [*overrides, "train.out_dir=unused"])
    return cfg.model.arch == "decoder_only" and not cfg.data.prepared


def prepared_data(out: Path, config, overrides: list[str]) -> str:
    """Tokenize the text once for every run of the sweep (``data.prepared``); returns that override."""
    from transformer_ln.config.run_config import load_run_config
    from transformer_ln.data.lm_store import build_lm_prepared

    where = out / "prepared"
    if not where.is_dir():
        build_lm_prepared(load_run_config(config, [*overrides, "train.out_dir=unused"]).data, where, progress=True)
    return f"data.prepared={where}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="base YAML config (default: the library defaults)")
    p.add_argument("--out", required=True, help="sweep folder: one run directory per point")
    p.add_argument("--results", help="where tables, claims.md, analysis.json and figures go (default: --out)")
    p.add_argument("--study", action="store_true", help="the CPU-scale study of issue 25 (schemes, grid, settings)")
    p.add_argument("--schemes", nargs="+", help="schemes, each with optional +options (default: the study's)")
    p.add_argument("--depths", type=_ints, help="layers, e.g. 6,24 (default 6; the study's: 6 and 24)")
    p.add_argument("--lrs", type=_floats, help="peak learning rates (default: the study's 1e-3..3e-1)")
    p.add_argument("--seeds", type=_ints, help="seeds, e.g. 1,2 (default 1; the study's: 1,2 at 6 layers, 1 at 24)")
    p.add_argument("--warmup", type=int, default=STUDY_WARMUP, help="warmup updates")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each one process, one thread)")
    p.add_argument("--trace-top", type=int, default=2, help="trace the runs at this many largest LRs (0: none)")
    p.add_argument("--no-analysis", action="store_true", help="tables only: no traces, profiles or figures")
    p.add_argument("--no-train", action="store_true", help="train nothing: tables and analysis of the finished runs")
    p.add_argument("--cpu", action="store_true", help="pass --cpu to every run")
    args, rest = p.parse_known_args(argv)
    overrides = [r for r in rest if r != "--"]
    if args.config and "=" in args.config:  # no config file: the first override landed there
        overrides.insert(0, args.config)
        args.config = None
    bad = [r for r in overrides if "=" not in r]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like section.key=value)")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be at least 1")
    out, t0 = Path(args.out), time.time()
    results = Path(args.results) if args.results else out
    schemes, lrs = args.schemes or STUDY_SCHEMES, args.lrs or STUDY_LRS
    overrides = [*STUDY, *overrides] if args.study else overrides
    if args.study and args.depths is None and args.seeds is None:
        points = [pt for depth, seeds in STUDY_GRID for pt in lr_points(schemes, [depth], lrs, seeds, args.warmup)]
    else:
        points = lr_points(schemes, args.depths or [6], lrs, args.seeds or [1], args.warmup)
    check_points(points, args.config, overrides)  # every config valid before the first run
    if prepare_once(args.config, overrides):
        out.mkdir(parents=True, exist_ok=True)
        overrides.append(prepared_data(out, args.config, overrides))
    print(f"{len(points)} runs in {out}, {args.jobs} at a time")
    if not args.no_train:
        run_lr_sweep(points, out, args.config, overrides, args.jobs, args.cpu)
    rows, sens = collect_lr(points, out, results)
    print((results / "lrs.md").read_text())
    if not args.no_analysis and rows:
        analysis = analyse(points, rows, out, top=args.trace_top)
        write_text(results / "analysis.json", json.dumps(jsonable(analysis), indent=1, allow_nan=False) + "\n")
        write_text(results / "claims.md", claims_markdown(sens, analysis))
        for path in plot_lr_sweep(rows, sens, analysis, results):
            print(f"wrote {path}")
    print(f"{len(rows)} of {len(points)} runs finished; {time.time() - t0:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, sys.argv[1:]))
