"""Typed config sections: the generic machinery behind ``transformer_ln.config.run_config``.

A section is a dataclass that mixes in ``Section``: its fields' annotations are the schema. ``check()`` (called
from ``__post_init__``) coerces YAML's loose scalars (``"7e-4"`` -> 0.0007, ``[0.9, 0.98]`` -> a tuple), rejects a
wrong type, a value outside a ``Literal[...]`` and a NaN or infinity in any float field, each as one line naming
the field, the value and what is allowed. ``to_dict``/``from_dict`` (unknown keys are an error) round-trip through
YAML; dotted overrides (``optim.lr=7e-4``) are applied to the plain dict before validation.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import UserError

CONFIG_FILE = "config.yaml"  # the name a run directory and each of its checkpoints give their config


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names it and says what is allowed."""


def choices(tp: Any) -> tuple:
    """The allowed values of a ``Literal[...]`` type (or ``Optional[Literal[...]]``)."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return tuple(v for a in typing.get_args(tp) for v in choices(a))


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: any length
            return isinstance(value, (tuple, list)) and all(_type_ok(v, args[0]) for v in value)
        return isinstance(value, (tuple, list)) and len(value) == len(args) and all(
            _type_ok(v, a) for v, a in zip(value, args))
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return "a list of " + ", ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def _accepts_float(tp: Any) -> bool:
    return _type_ok(1.5, tp)


def _coerce(value: Any, tp: Any) -> Any:
    """YAML 1.1 reads ``7e-4`` as a string and lists where we want tuples; an int is a valid float."""
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        value = tuple(value)
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,) and isinstance(value, str):
        value = tuple(v.strip() for v in value.split(",") if v.strip())  # "a,b" -> ("a", "b")
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,) and isinstance(value, tuple):
        return value
    if _accepts_float(tp) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typing.get_origin(tp) is tuple and isinstance(value, tuple):
        value = tuple(_coerce(v, a) for v, a in zip(value, typing.get_args(tp)))
    return value


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, tuple):
        return any(_non_finite(v) for v in value)
    return False


class Section:
    """Mixin for config dataclasses: strict ``from_dict``, ``to_dict``, type checks and YAML."""

    _prefix = ""

    def check(self) -> None:
        """Coerce and type-check every field; call first in ``__post_init__``."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Section):
                continue
            tp = hints[f.name]
            value = _coerce(value, tp)
            object.__setattr__(self, f.name, value)
            if not _type_ok(value, tp):
                raise ConfigError(f"{self._prefix}{f.name}: got {value!r}, expected {_type_name(tp)}")
            if _non_finite(value):
                raise ConfigError(f"{self._prefix}{f.name}: got {value!r}; NaN and infinity are not allowed, "
                                  "give a finite number")
            allowed = f.metadata.get("choices")  # choices read from a registry when asked
            if allowed is not None and value not in allowed():
                raise ConfigError(f"{self._prefix}{f.name}: got {value!r}, allowed: "
                                  f"{', '.join(map(repr, allowed()))}")

    # one-line range checks shared by the sections

    def positive(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and v <= 0:
                raise ConfigError(f"{self._prefix}{n}: got {v!r}, must be a positive number")

    def non_negative(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if v is not None and v < 0:
                raise ConfigError(f"{self._prefix}{n}: got {v!r}, must be >= 0")

    def probability(self, *names: str) -> None:
        for n in names:
            v = getattr(self, n)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{self._prefix}{n}: got {v!r}, must lie in [0, 1)")

    def at_least(self, name: str, low: float, why: str = "") -> None:
        v = getattr(self, name)
        if v is not None and v < low:
            raise ConfigError(f"{self._prefix}{name}: got {v!r}, must be at least {low}" + (f" ({why})" if why else ""))

    # (de)serialisation

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Section) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def keys(cls) -> list[str]:
        """The keys this section reads (its fields, unless a section shows some under other names)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict | None):
        d = dict(d or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(cls._prefix + str(k) for k in unknown)}; "
                              f"allowed: {', '.join(sorted(cls.keys()))}")
        kwargs = {}
        for k, v in d.items():
            tp = hints[k]
            if isinstance(tp, type) and issubclass(tp, Section):
                if not isinstance(v, (dict, type(None))):
                    raise ConfigError(f"{k}: expected a mapping of {tp.__name__} fields, got {v!r}")
                kwargs[k] = tp.from_dict(v)
            else:
                kwargs[k] = v
        return cls(**kwargs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str = "the config"):
        return cls.from_dict(parse_yaml_mapping(text, where))

    def save(self, path: str | Path) -> None:
        from ..atomic import write_text

        write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(read_yaml_mapping(path))


def parse_yaml_mapping(text: str, where: str) -> dict:
    """A YAML document that must be a mapping (or empty); anything else is one line naming ``where``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of sections (model/data/optim/train), got "
                          f"{type(data).__name__}")
    return data


def read_yaml_mapping(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    return parse_yaml_mapping(text, str(path))


# --------------------------------------------------------------------------------------------------------------
# dotted overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=7e-4'`` -> (['optim', 'lr'], 0.0007); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. model.residual=admin")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and raw.strip().lower() in ("none", "null", "~"):
        value = None
    return key.split("."), value


def apply_overrides(base: dict, overrides: list[str]) -> dict:
    """Return a copy of the nested dict ``base`` with each ``a.b=value`` applied (validation comes later)."""
    out = _deepcopy(base)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def _deepcopy(d: dict) -> dict:
    return {k: _deepcopy(v) if isinstance(v, dict) else v for k, v in d.items()}
