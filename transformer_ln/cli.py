"""``transformer-ln``: one entry point, one subcommand per job; each subcommand owns its own arguments.

Every command that builds a config (``train``, ``data``, ``analyze``) reads it with one grammar: an optional
``CONFIG.yaml`` first, then dotted ``section.key=value`` overrides, with options allowed anywhere in between
(``parse_intermixed_args``). A bad argument is one line on stderr, never a usage dump or a traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

from .errors import UserError

# name -> (module, function, one-line help); modules are imported only when their command runs
COMMANDS = {
    "train": ("transformer_ln.train", "main", "train a model (no CONFIG: a small model on the built-in corpus)"),
    "translate": ("transformer_ln.evaluation.evaluate", "translate_main", "translate sentences with a trained run"),
    "evaluate": ("transformer_ln.evaluation.evaluate", "evaluate_main",
                 "sacreBLEU and chrF of a run on a split or any --src/--ref test set (decoder-only runs: "
                 "perplexity, bits per byte)"),
    "generate": ("transformer_ln.evaluation.generate", "generate_main",
                 "continue a prompt with a decoder-only run (greedy, temperature, top-k, top-p)"),
    "average": ("transformer_ln.runs.checkpoint", "average_main", "average the last N checkpoints of a run"),
    "data": ("transformer_ln.data.cli", "main",
             "corpus statistics (stats); tokenize and encode once for many runs (prepare)"),
    "analyze": ("transformer_ln.evaluation.run_batch", "analyze_main",
                "dependency, output change, gradient norms, depth statistics, curves; our runs or --hf DIR"),
    "sweep": ("transformer_ln.training.sweep", "main",
              "a grid of runs (scheme x depth x lr x warmup x seed), resumable; results.md/.csv and plots"),
    "config": ("transformer_ln.config.cli", "main",
               "every config key: default, type, allowed values, help; --write a starter YAML"),
}

USAGE = """usage: transformer-ln COMMAND [ARGS...]

Post-LN, Pre-LN, Admin (Liu et al. 2020) and later schemes in encoder-decoder and decoder-only (GPT-2, LLaMA)
Transformers, with the paper's analysis tools and today's, on our models or any Hugging Face model.

commands:
{commands}

Start with:
  transformer-ln train --cpu                          # small model on the built-in corpus, a few minutes
  transformer-ln train model.residual=admin model.n_enc_layers=12 model.n_dec_layers=12
  accelerate launch -m transformer_ln.train CONFIG.yaml model.residual=pre_ln
  transformer-ln analyze dependency --out figs model.residual=post_ln
  transformer-ln train --cpu model.preset=gpt2 train.out_dir=runs/lm   # a decoder-only LM on the same corpus
  transformer-ln evaluate runs/lm --split test                          # perplexity, bits per byte
  transformer-ln generate runs/lm --prompt "the old man" --top-p 0.9
  transformer-ln analyze hidden-states --hf ./my-llama --text sample.txt --out figs   # a local HF model
  transformer-ln sweep --out runs/sweep --cpu --grid residual=post_ln,admin depth=3 -- train.max_updates=300
  transformer-ln evaluate runs/demo --src test.de --ref test.en   # any test set, sacreBLEU signature
Run `transformer-ln COMMAND --help` for a command's options, `transformer-ln config` for every setting
(section.key, default, allowed values, help) and `transformer-ln config --write my.yaml` for a starter config.
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items())
    return USAGE.format(commands=lines)


def run_command(fn, argv) -> int:
    """Run a subcommand; user errors become one line on stderr and exit status 2 (no traceback)."""
    from .config.run_config import ConfigError

    try:
        return int(fn(argv) or 0)
    except (UserError, ConfigError) as e:
        if os.environ.get("TRANSFORMER_LN_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    fn = getattr(importlib.import_module(module), func)
    return run_command(fn, rest)


if __name__ == "__main__":
    sys.exit(main())
