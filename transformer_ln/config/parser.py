"""The command-line grammar of configs, shared by every command: ``[CONFIG.yaml] [section.key=value ...]``.

``Parser`` is ``argparse`` whose errors are one line; ``resolve_config`` layers the library defaults, the demo's
settings, a CONFIG file (or a run's own ``config.yaml`` on resume) and dotted overrides, remembering where each
value came from. It lives below the library's commands so that no library module imports ``transformer_ln.cli``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .sections import CONFIG_FILE


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
KEY_SETTINGS = ("data.source", "data.vocab_size", "model.arch", "model.residual", "model.norm", "model.d_model", "model.n_enc_layers",
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
        """The key settings, then every other value that differs from the library default, each with its origin
        (default, demo, the CONFIG's path, override, or ``model.preset=NAME``)."""
        from .run_config import RunConfig

        flat = _flatten(self.cfg.to_dict())
        lines = [f"settings{' (the demo: small model, built-in corpus)' if self.demo else ''}:"]
        if flat.get("model.arch") == "decoder_only":  # a language model: its depth, block and components
            keys = tuple(k for k in keys if k != "model.n_enc_layers") + (
                "data.block_size", "model.preset", "model.positions", "model.activation")
        default = _flatten(RunConfig().to_dict())
        changed = [k for k in flat if k not in keys and _show(flat[k]) != _show(default.get(k))]
        def rows(names) -> list[str]:  # each block aligned on its own keys
            width = max(map(len, names))
            return [f"  {k.ljust(width)}  {_show(flat[k]):<12}  ({self.origins.get(k, DEFAULT)})" for k in names]

        lines += rows(keys)
        if changed:
            lines += ["  other values that differ from the defaults:", *rows(changed)]
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
    A key that no layer sets keeps its dataclass default. A layer that names ``model.preset`` puts the preset's
    settings over the layers below it; its own keys (and later layers) still win.
    """
    from .run_config import DEMO, PRESETS, RunConfig
    from .sections import apply_overrides, read_yaml_mapping

    config, overrides = split_config_arguments(items)
    if resume_dir is not None and config is not None:
        raise UserError(f"give either --resume RUN_DIR or a CONFIG ({config}), not both (overrides are allowed)")
    if demo and config is not None:
        raise UserError(f"give either --demo or a CONFIG ({config}), not both (the demo's settings are "
                        "config.DEMO; overrides are allowed)")
    layers: list[tuple[str, dict]] = []  # a key no layer sets keeps its dataclass default
    if resume_dir is not None:
        run_config = Path(resume_dir) / CONFIG_FILE  # the run's own config.yaml (``RunDir.config``)
        layers.append((str(run_config), read_yaml_mapping(run_config)))
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
    for name, layer in [*layers, (OVERRIDE, apply_overrides({}, overrides))]:
        preset = (layer.get("model") or {}).get("preset")
        if preset in PRESETS:
            base = _merge(base, {"model": PRESETS[preset]})
            origins.update({f"model.{k}": f"model.preset={preset}" for k in PRESETS[preset]})
        if name != OVERRIDE:
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
