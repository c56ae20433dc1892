"""``transformer-ln``: one entry point, one subcommand per job; each subcommand owns its own arguments.

Every command that builds a config (``train``, ``data``, ``analyze``) reads it with one grammar: an optional
``CONFIG.yaml`` first, then dotted ``section.key=value`` overrides, with options allowed anywhere in between
(``parse_intermixed_args``). A bad argument is one line on stderr, never a usage dump or a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

# name -> (module, function, one-line help); modules are imported only when their command runs
COMMANDS = {
    "train": ("transformer_ln.train", "main", "train a model (no CONFIG: a small model on the built-in corpus)"),
    "translate": ("transformer_ln.evaluate", "translate_main", "translate sentences with a trained run"),
    "evaluate": ("transformer_ln.evaluate", "evaluate_main", "sacreBLEU and chrF of a run on a split"),
    "average": ("transformer_ln.checkpoint", "average_main", "average the last N checkpoints of a run"),
    "data": ("transformer_ln.data.cli", "main",
             "corpus statistics (stats); tokenize and encode once for many runs (prepare)"),
    "analyze": ("transformer_ln.diagnostics.cli", "main",
                "output change, residual dependency, gradient norms, training curves"),
    "config": ("transformer_ln.config_cli", "main",
               "every config key: default, type, allowed values, help; --write a starter YAML"),
}

USAGE = """usage: transformer-ln COMMAND [ARGS...]

Post-LN, Pre-LN and Admin encoder-decoder Transformers (Liu et al. 2020), with the paper's analysis tools.

commands:
{commands}

Start with:
  transformer-ln train --cpu                          # small model on the built-in corpus, a few minutes
  transformer-ln train model.residual=admin model.n_enc_layers=12 model.n_dec_layers=12
  accelerate launch -m transformer_ln.train CONFIG.yaml model.residual=pre_ln
  transformer-ln analyze dependency --out figs model.residual=post_ln
Run `transformer-ln COMMAND --help` for a command's options, `transformer-ln config` for every setting
(section.key, default, allowed values, help) and `transformer-ln config --write my.yaml` for a starter config.
"""


class Parser(argparse.ArgumentParser):
    """``argparse`` whose errors are one ``UserError`` line (``--help`` still prints and exits)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


CONFIG_METAVAR = "[CONFIG.yaml] [section.key=value ...]"


def add_config_arguments(p: argparse.ArgumentParser, dest: str = "args") -> None:
    """The positional part of the config grammar; parse with ``parse_intermixed_args`` so options go anywhere."""
    p.add_argument(dest, nargs="*", metavar=CONFIG_METAVAR,
                   help="an optional YAML config, then dotted overrides such as optim.lr=7e-4; every key, its "
                        "default and allowed values: `transformer-ln config`")


def split_config_arguments(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] overrides...`` -> (CONFIG or None, overrides); anything else out of place is one clear line."""
    items = list(items)
    config = items.pop(0) if items and "=" not in items[0] else None
    if config is not None and not config.endswith((".yaml", ".yml")) and not Path(config).is_file():
        items.insert(0, config)  # not a config file either: report it as the stray argument it is
        config = None
    for item in items:
        if "=" not in item:
            raise UserError(f"unexpected argument {item!r}: give an optional CONFIG.yaml first, then "
                            "section.key=value overrides (options such as --cpu may go anywhere)")
    return config, items


DEFAULT, DEMO_ORIGIN, OVERRIDE = "default", "demo", "override"

# the settings that decide what a run is, printed before training with where each value came from
KEY_SETTINGS = ("data.source", "data.vocab_size", "model.residual", "model.d_model", "model.n_enc_layers",
                "model.n_dec_layers", "model.max_positions", "optim.lr", "optim.warmup_updates", "train.max_tokens",
                "train.update_freq", "train.max_epochs", "train.max_updates", "train.max_minutes", "train.keep_last",
                "train.out_dir")


@dataclass
class Resolved:
    """A config and, per dotted key, where its value came from: default, demo, the CONFIG's path or override."""

    cfg: Any
    origins: dict
    demo: bool

    def settings_block(self, keys: tuple = KEY_SETTINGS) -> str:
        flat = _flatten(self.cfg.to_dict())
        width = max(map(len, keys))
        lines = [f"settings{' (the demo: small model, built-in corpus)' if self.demo else ''}:"]
        lines += [f"  {k.ljust(width)}  {_show(flat[k]):<12}  ({self.origins.get(k, DEFAULT)})" for k in keys]
        lines.append("  (every key: `transformer-ln config`; change one with section.key=value)")
        return "\n".join(lines)


def _show(v) -> str:
    return "null" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolve_config(items: list[str], demo: bool = False, resume_dir: str | Path | None = None) -> Resolved:
    """The one config resolution of every command (``train``, ``data stats``, ``analyze``; ``evaluate`` reads
    the run's own config).

    Layers, later ones winning: the library defaults (``RunConfig()``, the base recipe); the demo's settings
    (``config.DEMO``) only when there is no CONFIG and the data is the built-in corpus, or with ``demo=True``;
    the CONFIG file (or, with ``resume_dir``, that run's ``config.yaml``) instead of both; the dotted overrides.
    A key that no layer sets keeps its dataclass default.
    """
    from .config import DEMO, RunConfig
    from .sections import apply_overrides, read_yaml_mapping

    config, overrides = split_config_arguments(items)
    if resume_dir is not None and config is not None:
        raise UserError(f"give either --resume RUN_DIR or a CONFIG ({config}), not both (overrides are allowed)")
    if demo and config is not None:
        raise UserError(f"give either --demo or a CONFIG ({config}), not both (the demo's settings are "
                        "config.DEMO; overrides are allowed)")
    layers: list[tuple[str, dict]] = []  # a key no layer sets keeps its dataclass default
    if resume_dir is not None:
        from .rundir import RunDir

        layers.append((str(RunDir(resume_dir).config), read_yaml_mapping(RunDir(resume_dir).config)))
    elif config is not None:
        layers.append((config, read_yaml_mapping(config)))
    else:
        layers.append((DEFAULT, RunConfig().to_dict()))
        source = apply_overrides(DEMO, overrides).get("data", {}).get("source")
        demo = demo or source == "synthetic"
        if demo:
            layers.append((DEMO_ORIGIN, DEMO))
    base: dict = {}
    origins: dict = {}
    for name, layer in layers:
        base = _merge(base, layer)
        origins.update({k: name for k in _flatten(layer)})
    for text in overrides:
        origins[text.split("=", 1)[0].strip()] = OVERRIDE
    return Resolved(RunConfig.from_dict(apply_overrides(base, overrides)), origins, demo and resume_dir is None)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in (b or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_arguments(items: list[str], demo: bool = False, resume_dir: str | Path | None = None):
    """The ``RunConfig`` a command line describes (``resolve_config(...).cfg``)."""
    return resolve_config(items, demo=demo, resume_dir=resume_dir).cfg


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items())
    return USAGE.format(commands=lines)


def run_command(fn, argv) -> int:
    """Run a subcommand; user errors become one line on stderr and exit status 2 (no traceback)."""
    from .config import ConfigError

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
