"""One typed configuration tree: ``RunConfig(model, data, optim, train)``.

Every section is a dataclass validated on construction (a bad value, NaN and infinity included, raises
``ConfigError`` naming the field, the value and what is allowed), serialises with ``to_dict``/``from_dict`` (unknown
keys are an error) and round-trips through YAML. Choice fields are ``Literal[...]`` types, so the allowed values
live in the annotation. Command-line overrides use dotted keys: ``model.residual=admin optim.lr=7e-4``. The generic
machinery is in ``transformer_ln.sections``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from .admin import ADMIN_OMEGAS as _ADMIN_OMEGAS
from .norms import NORMS
from .residual import SCHEMES
from .sections import ConfigError, Section, apply_overrides, choices, parse_override, read_yaml_mapping

__all__ = ["ConfigError", "ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "RunConfig", "RESIDUALS",
           "ADMIN_OMEGAS", "NORM_NAMES", "ACTIVATIONS", "DEMO", "apply_overrides", "parse_override",
           "load_run_config"]

ResidualName = Literal[tuple(SCHEMES)]  # the registry in transformer_ln.residual
NormName = Literal[tuple(NORMS)]  # transformer_ln.norms
AdminOmegaName = Literal[_ADMIN_OMEGAS]  # transformer_ln.admin
ActivationName = Literal["relu", "gelu"]
RESIDUALS = choices(ResidualName)
ADMIN_OMEGAS = choices(AdminOmegaName)
NORM_NAMES = choices(NormName)
ACTIVATIONS = choices(ActivationName)
SEED_LIMIT = 2 ** 32  # numpy's and accelerate's set_seed accept 0 .. 2**32 - 1


# --------------------------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig(Section):
    """Shape and residual scheme of the encoder-decoder.

    ``src_vocab_size``/``tgt_vocab_size`` may stay ``None`` inside a ``RunConfig``: the trainer fills them from the
    tokenizer. ``residual`` picks the scheme (see ``transformer_ln.residual``); ``norm`` the normalization its
    norms use (``transformer_ln.norms``; schemes without norms accept only the default); ``admin_omega`` picks
    Admin's shortcut scale: ``profile`` (the paper's profiling, ``admin_init``) or a closed form of admin-torch.
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
    activation: ActivationName = "relu"
    residual: ResidualName = "post_ln"
    norm: NormName = "layernorm"
    admin_omega: AdminOmegaName = "profile"
    share_embeddings: bool = False
    max_positions: int = 1024
    pad_id: int = 0

    def __post_init__(self) -> None:
        p = self._prefix
        self.check()
        self.positive("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "d_ff", "n_enc_layers",
                      "n_dec_layers", "max_positions")
        self.at_least("max_positions", 2, "a target needs <s> plus one token")
        self.probability("dropout", "attn_dropout", "act_dropout")
        if self.norm != "layernorm" and not SCHEMES[self.residual].has_norms:
            raise ConfigError(f"{p}norm: got {self.norm!r}, but {p}residual={self.residual!r} has no "
                              f"normalization; leave {p}norm at 'layernorm' (the default, unused by this scheme)")
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
    source: Literal["synthetic", "files", "hub"] = "synthetic"
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
    tokenizer_sample: Optional[int] = None  # train the BPE on at most this many pairs (a seeded sample)
    cache_dir: Optional[str] = None          # prepared data cached here, keyed by the settings (default RUN/cache)
    prepared: Optional[str] = None           # a directory from `transformer-ln data prepare`: read it, redo nothing
    num_proc: int = 1                        # processes encoding the corpus

    def __post_init__(self) -> None:
        p = self._prefix
        self.check()
        self.positive("synthetic_size", "vocab_size", "num_proc", "tokenizer_sample")
        self.at_least("vocab_size", 8, "4 special tokens and some text")
        if self.source == "files" and not self.prepared:
            for n in ("train_src", "train_tgt", "valid_src", "valid_tgt"):
                if not getattr(self, n):
                    raise ConfigError(f"{p}{n}: required when {p}source='files' (a path to a text, .gz or .jsonl file)")
            if (self.test_src is None) != (self.test_tgt is None):
                raise ConfigError(f"{p}test_src/{p}test_tgt: give both or neither")
        if self.source == "hub" and not self.hub_name and not self.prepared:
            raise ConfigError(f"{p}hub_name: required when {p}source='hub' (e.g. 'wmt14' or 'iwslt2017')")


@dataclass
class OptimConfig(Section):
    """Optimizer, schedule (fairseq's inverse square root) and loss."""

    _prefix = "optim."
    name: Literal["adam", "radam"] = "adam"
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
        self.check()
        self.positive("lr", "eps")
        self.non_negative("weight_decay", "clip_norm", "warmup_updates", "warmup_init_lr")
        self.probability("label_smoothing")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"{p}betas: got {list(self.betas)}, each must lie in [0, 1)")


@dataclass
class TrainConfig(Section):
    """The training loop: batching, length, precision, checkpoints, divergence and evaluation."""

    _prefix = "train."
    out_dir: str = "runs/run"
    seed: int = 1
    max_tokens: int = 4096
    update_freq: int = 1
    max_epochs: int = 0
    max_updates: int = 0
    max_minutes: float = 0.0
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    compile: bool = False
    diverge_loss: float = 30.0
    diverge_patience: int = 5
    save_every: int = 0
    save_epochs: bool = True
    keep_last: int = 5
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
        self.check()
        self.positive("max_tokens", "update_freq", "diverge_loss", "diverge_patience", "keep_last", "log_every",
                      "beam")
        self.non_negative("max_epochs", "max_updates", "max_minutes", "save_every", "valid_every",
                          "grad_norms_every", "max_len_a", "max_len_b")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"{p}seed: got {self.seed}, must lie in 0 .. {SEED_LIMIT - 1}")


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


# The demo's settings, on top of the library defaults above: a small model on the built-in corpus, a few CPU
# minutes. They apply only to the demo (no CONFIG and the built-in corpus, or ``train --demo``); a run on the user's
# own data starts from the library defaults (the base recipe) instead. See ``transformer_ln.cli.resolve_config``.
DEMO = {
    "model": {"d_model": 128, "n_heads": 4, "d_ff": 512, "n_enc_layers": 3, "n_dec_layers": 3, "dropout": 0.1,
              "share_embeddings": True, "max_positions": 256},
    "data": {"source": "synthetic", "vocab_size": 1000},
    "optim": {"lr": 2e-3, "warmup_updates": 300},
    "train": {"out_dir": "runs/demo", "max_tokens": 4096, "max_epochs": 30, "max_minutes": 4.0,
              "log_every": 20},
}


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """YAML file (or the built-in defaults) plus dotted overrides, validated."""
    base = read_yaml_mapping(path) if path is not None else {}
    return RunConfig.from_dict(apply_overrides(base, list(overrides)))
