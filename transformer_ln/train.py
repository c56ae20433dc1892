"""``transformer-ln train`` and ``accelerate launch -m transformer_ln.train``: the command line of the trainer.

The loop is ``transformer_ln.training.trainer``; one update is ``transformer_ln.training.update``; the run
directory (names, lock, metrics, summary) is ``transformer_ln.runs.rundir``; the divergence guard is
``transformer_ln.training.divergence``. A run that diverges is a result: ``summary.json`` says ``"status":
"diverged"`` and names the last good update and checkpoint, the only weights that were kept.
"""
from __future__ import annotations

# First, before the trainer's imports: a worker of `accelerate launch` whose launcher dies (even by kill -9, even
# now, while Python is still importing) stops instead of training on as an orphan (issue 26)
from .training.launcher import exit_when_launcher_dies, single_process_launch

exit_when_launcher_dies()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from .atomic import OutOfSpace  # noqa: E402
from .config.run_config import DEMO as _DEMO, RunConfig  # noqa: E402
from .errors import UserError  # noqa: E402
from .runs.rundir import RunDir  # noqa: E402
from .training.state import State  # noqa: E402, F401  (the public names of the trainer)
from .training.trainer import Trainer, UpdateContext  # noqa: E402, F401

# What `transformer-ln train` runs without a CONFIG on the built-in corpus (or with --demo); kept here by name
DEMO = _DEMO


def parse_args(argv: list[str]) -> argparse.Namespace:
    from .config.parser import Parser, add_config_arguments

    p = Parser(
        prog="transformer-ln train",
        description="Train a Post-LN, Pre-LN or Admin encoder-decoder. Without CONFIG on the built-in corpus "
                    "(or with --demo): the demo, a small model for a few CPU minutes (transformer_ln.config.DEMO). "
                    "On your own data (data.source=files ...) without CONFIG: the library defaults, the base "
                    "recipe. Settings are `section.key=value` overrides; options may come anywhere. Every key, "
                    "its default and allowed values: `transformer-ln config`.",
        epilog="examples:\n  transformer-ln train --cpu\n"
               "  transformer-ln train experiments/configs/cpu_synthetic.yaml model.residual=admin "
               "model.n_enc_layers=12\n  transformer-ln train --resume runs/demo train.max_updates=2000\n"
               "  accelerate launch -m transformer_ln.train CONFIG.yaml model.residual=pre_ln\n"
               "  accelerate launch --config_file experiments/accelerate/fsdp.yaml -m transformer_ln.train "
               "CONFIG.yaml   # FSDP2 (GPUs)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier run in train.out_dir first")
    p.add_argument("--demo", action="store_true", help="start from the demo's settings even on your own data")
    return p.parse_intermixed_args(argv)


def resolve_from_args(args: argparse.Namespace):
    """The run's config and where each value came from (``transformer_ln.cli.resolve_config``)."""
    from .config.parser import resolve_config

    if args.resume:
        run = RunDir(args.resume)
        if not run.path.is_dir():
            raise UserError(f"cannot resume: run directory {run} does not exist")
        if not run.config.is_file():
            raise UserError(f"cannot resume: {run.config} is missing, so {run} is not a run directory")
        return resolve_config(list(args.args) + [f"train.out_dir={run}"], resume_dir=run.path)
    return resolve_config(args.args, demo=args.demo)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return resolve_from_args(args).cfg


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except OutOfSpace as e:  # a full disk anywhere in the run: one line naming the path and the space it needs
        _end_progress_bars()
        raise UserError(str(e)) from None
    except UserError:
        _end_progress_bars()
        raise


def _end_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the error's line starts a line of its own."""
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()


def _main(argv: list[str] | None) -> int:
    alone = single_process_launch()
    if alone:
        raise UserError(alone)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    resolved = resolve_from_args(args)
    cfg = resolved.cfg
    if os.environ.get("RANK", "0") == "0":
        print(resolved.settings_block(), flush=True)
    trainer = Trainer(cfg, cpu=args.cpu, resume=bool(args.resume), overwrite=args.overwrite)
    summary = trainer.run()
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=1))
    done_before = trainer.finished and trainer.rundir.find_eval("test") is not None
    if summary["status"] == "completed" and cfg.train.bleu_at_end and not done_before:
        trainer.task.evaluate_at_end(trainer.run_dir, trainer.accelerator)  # translation: test BLEU of best
    return 0


if __name__ == "__main__":
    from .cli import run_command

    sys.exit(run_command(main, sys.argv[1:]))
