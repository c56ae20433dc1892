"""One typed configuration tree: ``RunConfig(model, data, optim, train)``.

Every section is a dataclass validated on construction (a bad value raises ``ValueError`` naming the field, the
value and what is allowed), serialises with ``to_dict``/``from_dict`` (unknown keys are an error) and round-trips
through YAML. Command-line overrides use dotted keys: ``model.residual=admin optim.lr=7e-4``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import UserError

RESIDUALS = ("post_ln", "pre_ln", "admin")
ADMIN_OMEGAS = ("profile", "O(logn)", "O(n)", "O(1)")
ACTIVATIONS = ("relu", "gelu")


class ConfigError(UserError, ValueError):
    """A configuration value or key is wrong; the message names it and says what is allowed."""


# --------------------------------------------------------------------------------------------------------------
# generic typed (de)serialisation shared by every section


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
        return "a list of " + ", ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


class Section:
    """Mixin for config dataclasses: strict ``from_dict``, ``to_dict``, type checks and YAML."""

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        prefix = getattr(type(self), "_prefix", "")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints[f.name]
            if isinstance(value, Section):
                continue
            if typing.get_origin(tp) is tuple and isinstance(value, list):
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if _type_ok(1.5, tp) and isinstance(value, str):  # YAML 1.1 reads "7e-4" as a string
                try:
                    value = float(value)
                    object.__setattr__(self, f.name, value)
                except ValueError:
                    pass
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, f.name, value)
            if not _type_ok(value, tp):
                raise ConfigError(f"{prefix}{f.name}: got {value!r}, expected {_type_name(tp)}")

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Section) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, d: dict | None):
        d = dict(d or {})
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        prefix = getattr(cls, "_prefix", "")
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; "
                              f"allowed: {', '.join(sorted(names))}")
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
    def from_yaml(cls, text: str):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"the YAML must be a mapping of keys to values, got {type(data).__name__}")
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write YAML atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return cls.from_yaml(path.read_text())


def _positive(prefix: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is not None and v <= 0:
            raise ConfigError(f"{prefix}{n}: got {v!r}, must be a positive number")


def _non_negative(prefix: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v < 0:
            raise ConfigError(f"{prefix}{n}: got {v!r}, must be >= 0")


def _probability(prefix: str, obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not 0.0 <= v < 1.0:
            raise ConfigError(f"{prefix}{n}: got {v!r}, must lie in [0, 1)")


def _choice(prefix: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{prefix}{name}: got {value!r}, allowed: {', '.join(map(repr, allowed))}")


# --------------------------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig(Section):
    """Shape and residual scheme of the encoder-decoder.

    ``src_vocab_size``/``tgt_vocab_size`` may stay ``None`` inside a ``RunConfig``: the trainer fills them from the
    tokenizer. ``residual`` picks the scheme (see ``transformer_ln.residual``); ``admin_omega`` picks Admin's
    shortcut scale: ``profile`` (the paper's profiling, ``admin_init``) or a closed form of admin-torch.
    """

    _prefix = "model."
    src_vocab_size: Optional[int] = None
    tgt_vocab_size: Optional[int] = None
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_enc_layers: int = 6
    n_dec_layers: int = 6
    dropout: float = 0.1
    attn_dropout: float = 0.0
    act_dropout: float = 0.0
    activation: str = "relu"
    residual: str = "post_ln"
    admin_omega: str = "profile"
    share_embeddings: bool = False
    max_positions: int = 1024
    pad_id: int = 0

    def __post_init__(self) -> None:
        p = self._prefix
        self._check_types()
        _positive(p, self, "src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "d_ff", "n_enc_layers",
                  "n_dec_layers", "max_positions")
        _probability(p, self, "dropout", "attn_dropout", "act_dropout")
        _choice(p, "activation", self.activation, ACTIVATIONS)
        _choice(p, "residual", self.residual, RESIDUALS)
        _choice(p, "admin_omega", self.admin_omega, ADMIN_OMEGAS)
        if self.d_model % self.n_heads:
            raise ConfigError(f"{p}d_model: got {self.d_model}, must be divisible by {p}n_heads={self.n_heads}")
        if self.pad_id < 0:
            raise ConfigError(f"{p}pad_id: got {self.pad_id}, must be >= 0")
        for n in ("src_vocab_size", "tgt_vocab_size"):
            v = getattr(self, n)
            if v is not None and self.pad_id >= v:
                raise ConfigError(f"{p}pad_id: got {self.pad_id}, must be smaller than {p}{n}={v}")
        if (self.share_embeddings and self.src_vocab_size is not None
                and self.src_vocab_size != self.tgt_vocab_size):
            raise ConfigError(f"{p}share_embeddings: needs src_vocab_size == tgt_vocab_size, got "
                              f"{self.src_vocab_size} and {self.tgt_vocab_size}")


@dataclass
class DataConfig(Section):
    """Where the parallel text comes from and how it is tokenized (see ``transformer_ln.data``)."""

    _prefix = "data."
    source: str = "synthetic"
    synthetic_size: int = 20000
    synthetic_seed: int = 1234
    train_src: Optional[str] = None
    train_tgt: Optional[str] = None
    valid_src: Optional[str] = None
    valid_tgt: Optional[str] = None
    test_src: Optional[str] = None
    test_tgt: Optional[str] = None
    src_lang: Optional[str] = None
    tgt_lang: Optional[str] = None
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    vocab_size: int = 8000
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        p = self._prefix
        self._check_types()
        _choice(p, "source", self.source, ("synthetic", "files", "hub"))
        _positive(p, self, "synthetic_size", "vocab_size")
        if self.vocab_size < 8:
            raise ConfigError(f"{p}vocab_size: got {self.vocab_size}, must be at least 8")
        if self.source == "files":
            for n in ("train_src", "train_tgt", "valid_src", "valid_tgt"):
                if not getattr(self, n):
                    raise ConfigError(f"{p}{n}: required when {p}source='files' (a path to a text, .gz or .jsonl file)")
            if (self.test_src is None) != (self.test_tgt is None):
                raise ConfigError(f"{p}test_src/{p}test_tgt: give both or neither")
        if self.source == "hub" and not self.hub_name:
            raise ConfigError(f"{p}hub_name: required when {p}source='hub' (e.g. 'wmt14' or 'iwslt2017')")


@dataclass
class OptimConfig(Section):
    """Optimizer, schedule (fairseq's inverse square root) and loss."""

    _prefix = "optim."
    name: str = "adam"
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 0.0
    warmup_updates: int = 4000
    warmup_init_lr: float = 1e-7
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        p = self._prefix
        self._check_types()
        _choice(p, "name", self.name, ("adam", "radam"))
        _positive(p, self, "lr", "eps")
        _non_negative(p, self, "weight_decay", "clip_norm", "warmup_updates", "warmup_init_lr")
        _probability(p, self, "label_smoothing")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"{p}betas: got {list(self.betas)}, each must lie in [0, 1)")


@dataclass
class TrainConfig(Section):
    """The training loop: batching, length, precision, checkpoints, divergence and evaluation."""

    _prefix = "train."
    out_dir: str = "runs/demo"
    seed: int = 1
    max_tokens: int = 4096
    update_freq: int = 1
    max_epochs: int = 0
    max_updates: int = 0
    max_minutes: float = 0.0
    mixed_precision: str = "auto"
    compile: bool = False
    diverge_loss: float = 30.0
    diverge_patience: int = 5
    save_every: int = 0
    save_epochs: bool = True
    keep_last: int = 2
    valid_every: int = 0
    log_every: int = 10
    grad_norms_every: int = 0
    tensorboard: bool = False
    beam: int = 5
    lenpen: float = 1.0
    max_len_a: float = 1.2
    max_len_b: int = 10
    bleu_at_end: bool = True

    def require_stop(self) -> None:
        """Training needs a stopping rule; checked when a run starts, so partial sections stay valid."""
        p = self._prefix
        if self.max_epochs == 0 and self.max_updates == 0 and self.max_minutes == 0:
            raise ConfigError(f"{p}max_epochs/{p}max_updates/{p}max_minutes: set at least one of them above 0")

    def __post_init__(self) -> None:
        p = self._prefix
        self._check_types()
        _positive(p, self, "max_tokens", "update_freq", "diverge_loss", "diverge_patience", "keep_last",
                  "log_every", "beam")
        _non_negative(p, self, "max_epochs", "max_updates", "max_minutes", "save_every", "valid_every",
                      "grad_norms_every", "max_len_a", "max_len_b")
        _choice(p, "mixed_precision", self.mixed_precision, ("auto", "no", "fp16", "bf16"))


@dataclass
class RunConfig(Section):
    """Everything a training run needs; written to ``<out_dir>/config.yaml``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_epochs=10))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), Section):
                raise ConfigError(f"{f.name}: expected a section, got {getattr(self, f.name)!r}")


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


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """YAML file (or the built-in defaults) plus dotted overrides, validated."""
    base: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            base = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"{path} must hold a mapping with sections model/data/optim/train")
    return RunConfig.from_dict(apply_overrides(base, list(overrides)))
