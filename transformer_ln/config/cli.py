"""``transformer-ln config``: every config key with its default, type, allowed values and one line of help.

The help is each field's metadata in ``transformer_ln.config.run_config`` (one place; a scheme's options carry their
own); ``--write FILE`` writes a starter YAML (every key at its default, its help as a comment) to edit and pass to
``transformer-ln train FILE``.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from ..atomic import write_text
from .parser import Parser
from ..errors import UserError
from .sections import Section, _type_name, choices


def rows(cfg: Section | None = None) -> list[dict]:
    """One dict per dotted key: key, default (of ``cfg``), type, allowed values (choice fields) and help."""
    from .run_config import RunConfig

    cfg = RunConfig() if cfg is None else cfg
    out = []
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            if "expands" in f.metadata:  # a mapping shown as keys of its own (the schemes' options)
                for name, spec in f.metadata["expands"]().items():
                    out.append({"key": f"{sec.name}.{name}", "default": getattr(section, name),
                                "type": "choice" if spec.allowed else type(spec.default).__name__,
                                "allowed": list(spec.allowed), "help": spec.help})
                continue
            tp = hints[f.name]
            allowed = choices(tp) or (f.metadata["choices"]() if "choices" in f.metadata else ())
            out.append({"key": f"{sec.name}.{f.name}", "default": getattr(section, f.name),
                        "type": "choice" if allowed else _type_name(tp), "allowed": list(allowed),
                        "help": f.metadata.get("help", "")})
    return out


def _show(v) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(map(_show, v)) + "]"
    return "null" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def describe(cfg: Section | None = None) -> str:
    table = rows(cfg)
    wk = max(len(r["key"]) for r in table)
    wd = max(len(_show(r["default"])) for r in table)
    lines = [f"{'key'.ljust(wk)}  {'default'.ljust(wd)}  help  [type or allowed values]"]
    for r in table:
        kind = "one of " + ", ".join(map(str, r["allowed"])) if r["allowed"] else r["type"]
        lines.append(f"{r['key'].ljust(wk)}  {_show(r['default']).ljust(wd)}  {r['help']}  [{kind}]")
    return "\n".join(lines)


def starter_yaml(cfg: Section | None = None) -> str:
    """A commented YAML of every key at its value in ``cfg``; loads back to the same config."""
    import yaml

    table = {r["key"]: r for r in rows(cfg)}
    from .run_config import RunConfig

    cfg = RunConfig() if cfg is None else cfg
    out = ["# transformer_ln run config: every key with its default; `transformer-ln config` explains each.",
           "# Train with: transformer-ln train THIS.yaml [section.key=value ...]"]
    for section, values in cfg.to_dict().items():
        out.append(f"{section}:")
        for k, v in values.items():
            r = table[f"{section}.{k}"]
            value = yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
            kind = f" [one of {', '.join(map(str, r['allowed']))}]" if r["allowed"] else ""
            out.append(f"  {k}: {value}  # {r['help']}{kind}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    p = Parser(prog="transformer-ln config", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", action="store_true", help="show the demo's values (config.DEMO) instead of the "
                   "library defaults")
    p.add_argument("--write", metavar="FILE", help="write a starter YAML with every key and its help")
    p.add_argument("--grep", metavar="TEXT", help="only keys or help lines containing TEXT")
    args = p.parse_args(argv)
    from .parser import resolve_config

    from .run_config import RunConfig

    cfg = resolve_config([], demo=True).cfg if args.demo else RunConfig()
    if args.write:
        if not args.write.endswith((".yaml", ".yml")):
            raise UserError(f"--write {args.write}: give a .yaml file name")
        write_text(args.write, starter_yaml(cfg))
        print(f"wrote {args.write}; edit it, then: transformer-ln train {args.write}")
        return 0
    text = describe(cfg)
    if args.grep:
        text = "\n".join(ln for ln in text.splitlines() if args.grep.lower() in ln.lower())
    which = "the demo's values (train with no CONFIG on the built-in corpus)" if args.demo else \
        "library defaults (a run on your own data without CONFIG)"
    print(f"{which}:\n{text}")
    return 0
