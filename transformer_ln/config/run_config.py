"""One typed configuration tree: ``RunConfig(model, data, optim, train)``.

Every section is a dataclass validated on construction (a bad value, NaN and infinity included, raises
``ConfigError`` naming the field, the value and what is allowed), serialises with ``to_dict``/``from_dict`` (unknown
keys are an error) and round-trips through YAML. Choice fields are ``Literal[...]`` types, so the allowed values
live in the annotation; the scheme and its options are read from the model's registry when a config is built, so a
scheme registered later is a valid choice. Command-line overrides use dotted keys: ``model.residual=admin
optim.lr=7e-4``. The generic machinery is in ``transformer_ln.config.sections``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..model.norms import NORMS
from ..model.schemes import SCHEMES
from .recipes import DEMO, PRESETS
from .sections import ConfigError, Section, apply_overrides, choices, parse_override, read_yaml_mapping

__all__ = ["ConfigError", "ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "RunConfig", "RESIDUALS",
           "NORM_NAMES", "scheme_option_specs", "ACTIVATIONS", "DEMO", "PRESETS", "ARCHS", "apply_overrides", "parse_override",
           "load_run_config"]

NormName = Literal[tuple(NORMS)]  # transformer_ln.model.norms
ActivationName = Literal["relu", "gelu", "gelu_tanh", "swiglu"]  # transformer_ln.model.layers.FeedForward
ArchName = Literal["encoder_decoder", "decoder_only"]
PositionsName = Literal["sinusoidal", "learned", "rope"]  # transformer_ln.model.positions
RESIDUALS = tuple(SCHEMES)  # the schemes registered at import (the config itself reads the registry when asked)
NORM_NAMES = choices(NormName)
ACTIVATIONS = choices(ActivationName)
ARCHS = choices(ArchName)
# accelerate's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS; a test keeps the two in step)
TRACKERS = ("aim", "comet_ml", "mlflow", "tensorboard", "wandb", "clearml", "dvclive", "swanlab", "trackio")
SEED_LIMIT = 2 ** 32  # numpy's and accelerate's set_seed accept 0 .. 2**32 - 1


def opt(default, help: str, **metadata):
    """A config field with its one line of help (``transformer-ln config`` prints it)."""
    return field(default=default, metadata={"help": help, **metadata})


def scheme_names() -> tuple[str, ...]:
    """The registered schemes, read when asked (a scheme registered after import is a valid choice too)."""
    return tuple(SCHEMES)


def scheme_option_specs() -> dict:
    """Every registered scheme's own settings (``ResidualScheme.options``), each a config key ``model.<name>``."""
    return {name: spec for cls in SCHEMES.values() for name, spec in cls.options.items()}


# --------------------------------------------------------------------------------------------------------------
# sections


@dataclass
class ModelConfig(Section):
    """Architecture, shape and residual scheme of the model.

    ``arch`` picks the encoder-decoder (``Seq2SeqTransformer``) or the decoder-only language model (``CausalLM``;
    its depth is ``n_dec_layers``, its vocabulary ``tgt_vocab_size``; ``n_enc_layers`` and ``src_vocab_size`` are
    unused). ``preset`` (``gpt2``, ``llama``) fills the component settings of ``PRESETS``; any field given beside it
    wins.

    ``src_vocab_size``/``tgt_vocab_size`` may stay ``None`` inside a ``RunConfig``: the trainer fills them from the
    tokenizer. ``residual`` picks the scheme (see ``transformer_ln.model.schemes``); ``norm`` the normalization its
    norms use (``transformer_ln.model.norms``; schemes without norms accept only the default). Each scheme's own
    settings (``ResidualScheme.options``, e.g. Admin's ``admin_omega``) are keys of this section too: given as
    ``model.<name>`` (or ``ModelConfig(<name>=...)``), read as ``cfg.<name>``, kept in ``scheme_options``.
    """

    _prefix = "model."
    arch: ArchName = opt("encoder_decoder", "encoder_decoder (translation) or decoder_only (a causal language model)")
    preset: Optional[Literal[tuple(PRESETS)]] = opt(None, "gpt2 or llama: fills arch, positions, activation, norm, "
                                                    "bias and tying as those models have them; fields given win")
    src_vocab_size: Optional[int] = opt(None, "source vocabulary; null: taken from the trained tokenizer")
    tgt_vocab_size: Optional[int] = opt(None, "target vocabulary; null: taken from the trained tokenizer")
    d_model: int = opt(512, "width of the residual stream")
    n_heads: int = opt(8, "attention heads (must divide d_model)")
    d_ff: int = opt(2048, "hidden width of the feed-forward sub-layers")
    n_enc_layers: int = opt(6, "encoder layers")
    n_dec_layers: int = opt(6, "decoder layers")
    dropout: float = opt(0.1, "dropout on each branch output and the embeddings")
    attn_dropout: float = opt(0.0, "dropout on the attention probabilities")
    act_dropout: float = opt(0.0, "dropout after the FFN activation")
    activation: ActivationName = opt("relu", "FFN activation: relu, gelu, gelu_tanh (GPT-2's) or swiglu (LLaMA's)")
    positions: PositionsName = opt("sinusoidal", "token positions: sinusoidal (added), learned (added, GPT-2) or "
                                   "rope (rotary, in self-attention: LLaMA)")
    rope_theta: float = opt(10000.0, "base of the rotary frequencies (positions=rope)")
    bias: bool = opt(True, "biases in the attention and FFN projections (LLaMA has none)")
    tie_embeddings: bool = opt(True, "the output projection is the (target) input embedding")
    scale_embeddings: bool = opt(True, "token embeddings times sqrt(d_model), as fairseq (GPT-2 and LLaMA: no)")
    norm_eps: float = opt(1e-5, "epsilon of the norms (LLaMA checkpoints use 1e-6 or 1e-5)")
    residual: str = opt("post_ln", "residual/normalization scheme (transformer_ln.model.schemes)",
                        choices=scheme_names)
    norm: NormName = opt("layernorm", "normalization the scheme's norms use (transformer_ln.model.norms)")
    qk_norm: bool = opt(False, "a norm (model.norm) per head on queries and keys, before rotary positions (QK-norm)")
    branch_scale: Literal["none", "depth_mup", "completep"] = opt(
        "none", "multiply each residual branch by (L/branch_base_depth)^-a: depth_mup a=1/2, completep a=1, with "
        "their Adam learning-rate rule (transformer_ln.model.depth_scaling)")
    branch_base_depth: int = opt(1, "L_base of model.branch_scale (the depth at which the multiplier is 1)")
    # the schemes' own settings (Admin's admin_omega...): keys model.<name> in YAML and on the command line, read
    # as attributes (cfg.admin_omega); each scheme declares them, so this file names none of them
    scheme_options: dict = field(default_factory=dict, metadata={"expands": scheme_option_specs})
    share_embeddings: bool = opt(False, "one embedding for source, target and output (equal vocabularies)")
    max_positions: int = opt(1024, "longest sequence in tokens; longer training pairs are filtered out")
    pad_id: int = opt(0, "id of the padding token")

    def __post_init__(self) -> None:
        p = self._prefix
        self.check()
        specs = scheme_option_specs()
        unknown = sorted(set(self.scheme_options) - set(specs))
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(p + k for k in unknown)}; no registered scheme has them")
        try:
            self.scheme_options = {k: s.check(p + k, self.scheme_options.get(k, s.default)) for k, s in specs.items()}
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.positive("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "d_ff", "n_enc_layers",
                      "n_dec_layers", "max_positions", "rope_theta", "norm_eps", "branch_base_depth")
        self.at_least("max_positions", 2, "a target needs <s> plus one token")
        self.probability("dropout", "attn_dropout", "act_dropout")
        if self.norm != "layernorm" and not SCHEMES[self.residual].has_norms:
            raise ConfigError(f"{p}norm: got {self.norm!r}, but {p}residual={self.residual!r} has no "
                              f"normalization; leave {p}norm at 'layernorm' (the default, unused by this scheme)")
        if self.d_model % self.n_heads:
            raise ConfigError(f"{p}d_model: got {self.d_model}, must be divisible by {p}n_heads={self.n_heads}")
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"{p}positions: 'rope' rotates pairs of a head's dimensions; d_model / n_heads = "
                              f"{self.d_model // self.n_heads} is odd")
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

    def __getattr__(self, name: str):
        options = self.__dict__.get("scheme_options")
        if options is not None and name in options:
            return options[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict:
        """The fields, with the schemes' options as keys of their own (after ``norm``), as YAML holds them."""
        out = {}
        for k, v in super().to_dict().items():
            if k != "scheme_options":
                out[k] = v
            if k == "norm":
                out.update(self.scheme_options)
        return out

    @classmethod
    def keys(cls) -> list[str]:
        return [k for k in super().keys() if k != "scheme_options"] + list(scheme_option_specs())

    @classmethod
    def from_dict(cls, d: dict | None):
        d = dict(d or {})
        specs = scheme_option_specs()
        options = {**d.pop("scheme_options", {}), **{k: d.pop(k) for k in list(d) if k in specs}}
        return super().from_dict({**d, "scheme_options": options})


def _init_with_scheme_options(init):
    """``ModelConfig(admin_omega=...)``: a scheme's option given as a keyword goes into ``scheme_options``; a
    ``preset`` fills the fields not given."""
    def __init__(self, *args, **kwargs):
        specs = scheme_option_specs()
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in specs}
        if given:
            kwargs["scheme_options"] = {**(kwargs.get("scheme_options") or {}), **given}
        preset = kwargs.get("preset")
        if preset is not None and preset in PRESETS:  # the preset's settings under the ones given
            kwargs = {**PRESETS[preset], **kwargs}
        init(self, *args, **kwargs)
    return __init__


ModelConfig.__init__ = _init_with_scheme_options(ModelConfig.__init__)


@dataclass
class DataConfig(Section):
    """Where the parallel text comes from and how it is tokenized (see ``transformer_ln.data``)."""

    _prefix = "data."
    source: Literal["synthetic", "files", "hub"] = opt("synthetic", "the built-in corpus, your files or a hub dataset")
    synthetic_size: int = opt(20000, "training pairs of the built-in corpus")
    synthetic_seed: int = opt(1234, "seed of the built-in corpus")
    train_src: Optional[str] = opt(None, "source training text: one sentence a line; .gz or .jsonl too")
    train_tgt: Optional[str] = opt(None, "target side of the training data")
    valid_src: Optional[str] = opt(None, "source side of the validation data")
    valid_tgt: Optional[str] = opt(None, "target side of the validation data")
    test_src: Optional[str] = opt(None, "source side of the test data (optional; for BLEU at the end)")
    test_tgt: Optional[str] = opt(None, "target side of the test data")
    src_lang: Optional[str] = opt(None, "source language key in .jsonl/hub translation records")
    tgt_lang: Optional[str] = opt(None, "target language key in .jsonl/hub translation records")
    hub_name: Optional[str] = opt(None, "datasets hub name, e.g. wmt14 (offline: use local files)")
    hub_config: Optional[str] = opt(None, "datasets hub config, e.g. de-en")
    vocab_size: int = opt(8000, "joint BPE vocabulary trained on the training split")
    unescape: bool = opt(False, "join BPE '@@ ' markers and unescape Moses entities (&apos;) before our BPE")
    detokenize: Literal["none", "moses"] = opt("none", "moses: Moses-tokenized text back to plain text (sacremoses; "
                                               "implies unescape) on every split, so BLEU scores plain text")
    tokenizer_sample: Optional[int] = opt(None, "train the BPE on at most this many pairs (a seeded sample)")
    cache_dir: Optional[str] = opt(None, "prepared data cached here, keyed by the settings (default RUN/cache)")
    prepared: Optional[str] = opt(None, "a directory from `transformer-ln data prepare`: read it, redo nothing")
    num_proc: int = opt(1, "processes encoding the corpus")
    # decoder-only language models (model.arch=decoder_only): text packed into fixed-length blocks
    block_size: int = opt(256, "decoder-only: tokens per training block (documents packed, separated by </s>)")
    train_text: Optional[str] = opt(None, "decoder-only: training text (.txt one document per line or one long "
                                    "text, .gz, .jsonl/.json/.parquet, or a datasets save_to_disk directory)")
    valid_text: Optional[str] = opt(None, "decoder-only: validation text (as train_text)")
    test_text: Optional[str] = opt(None, "decoder-only: test text (optional; perplexity at the end)")
    text_field: str = opt("text", "decoder-only: the field holding the text in .jsonl/.json/.parquet/datasets")

    def __post_init__(self) -> None:
        p = self._prefix
        self.check()
        self.positive("synthetic_size", "vocab_size", "num_proc", "tokenizer_sample")
        self.at_least("block_size", 2, "a block is inputs plus the next token")
        self.at_least("vocab_size", 8, "4 special tokens and some text")
        if self.source == "files" and not self.prepared and self.train_text is not None:
            if not self.valid_text:
                raise ConfigError(f"{p}valid_text: required with {p}train_text (validation perplexity)")
        elif self.source == "files" and not self.prepared:
            for n in ("train_src", "train_tgt", "valid_src", "valid_tgt"):
                if not getattr(self, n):
                    raise ConfigError(f"{p}{n}: required when {p}source='files' (a path to a text, .gz or .jsonl file)")
            if (self.test_src is None) != (self.test_tgt is None):
                raise ConfigError(f"{p}test_src/{p}test_tgt: give both or neither")
        paths = [f.name for f in dataclasses.fields(self) if f.name.endswith(("_src", "_tgt", "_text"))]
        ignored = [n for n in paths if getattr(self, n) is not None]  # read only with data.source=files
        if self.source != "files" and ignored and not self.prepared:
            raise ConfigError(f"{p}{ignored[0]}: given, but {p}source={self.source!r} does not read it (add "
                              f"{p}source=files to train on your files, or drop {p}{ignored[0]})")
        if self.source == "hub" and not self.hub_name and not self.prepared:
            raise ConfigError(f"{p}hub_name: required when {p}source='hub' (e.g. 'wmt14' or 'iwslt2017')")


MAX_LR = 100.0  # optim.lr and optim.warmup_init_lr above this are refused (divergence tests use up to 30)


@dataclass
class OptimConfig(Section):
    """Optimizer, schedule (fairseq's inverse square root) and loss."""

    _prefix = "optim."
    name: Literal["adam", "radam"] = opt("adam", "adam (AdamW) or radam")
    lr: float = opt(5e-4, "peak learning rate, reached after warmup (at most 100)")
    betas: tuple[float, float] = opt((0.9, 0.98), "Adam betas")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.0, "decoupled weight decay")
    clip_norm: float = opt(0.0, "clip the gradient norm to this (0: no clipping)")
    warmup_updates: int = opt(4000, "linear warmup updates of the inverse-sqrt schedule")
    warmup_init_lr: float = opt(1e-7, "learning rate at update 0")
    label_smoothing: float = opt(0.1, "label smoothing epsilon")
    z_loss: float = opt(0.0, "add this times log^2 Z (Z: the softmax normaliser) per token to the loss; PaLM: 1e-4")

    def __post_init__(self) -> None:
        p = self._prefix
        self.check()
        self.positive("lr", "eps")
        self.non_negative("weight_decay", "clip_norm", "warmup_updates", "warmup_init_lr", "z_loss")
        self.probability("label_smoothing")
        for n in ("lr", "warmup_init_lr"):  # larger steps only overflow the weights (lr=1e308: inf at update 2)
            if getattr(self, n) > MAX_LR:
                raise ConfigError(f"{p}{n}: got {getattr(self, n)!r}, must be at most {MAX_LR:g} (a larger step "
                                  "only blows the weights up; Transformer peaks are about 1e-4 to 1e-2)")
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"{p}betas: got {list(self.betas)}, each must lie in [0, 1)")


@dataclass
class TrainConfig(Section):
    """The training loop: batching, length, precision, checkpoints, divergence and evaluation."""

    _prefix = "train."
    task: Literal["auto", "translation", "language_model"] = opt(
        "auto", "what is trained: translation (pairs, BLEU at the end) or language_model (text, perplexity); auto: "
        "from model.arch; transformer_ln.training.task")
    out_dir: str = opt("runs/run", "run directory: config, tokenizer, metrics, checkpoints, evaluations")
    seed: int = opt(1, "seed of init, dropout and batch order")
    max_tokens: int = opt(4096, "tokens per batch per process, padding included")
    update_freq: int = opt(1, "batches accumulated per update")
    max_epochs: int = opt(0, "stop after this many epochs (0: no limit)")
    max_updates: int = opt(0, "stop after this many updates (0: no limit)")
    max_minutes: float = opt(0.0, "stop after this much training time (0: no limit)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = opt("auto",
                                                                "auto: bf16 on GPUs that support it, fp32 on CPU")
    compile: bool = opt(False, "torch.compile the model (worth it on a GPU)")
    diverge_loss: float = opt(30.0, "an update whose loss exceeds this (bits) is skipped")
    diverge_patience: int = opt(5, "this many skipped updates in a row end the run as diverged")
    save_every: int = opt(0, "checkpoint every N updates (0: only at epoch ends / the end)")
    save_epochs: bool = opt(True, "checkpoint at the end of each epoch")
    keep_last: int = opt(5, "update checkpoints kept (besides best); average --last N needs N <= this")
    valid_every: int = opt(0, "validate every N updates (0: at epoch ends)")
    valid_max_sentences: int = opt(0, "validate on the first N valid pairs (decoder-only: blocks); 0: all of them")
    log_every: int = opt(10, "progress-bar and log interval in updates")
    grad_norms_every: int = opt(0, "log per-sub-layer gradient norms every N updates (0: never)")
    tensorboard: bool = opt(False, "shorthand for train.trackers=[tensorboard]")
    trackers: tuple[str, ...] = opt((), "experiment trackers through accelerate, e.g. [tensorboard, wandb]; offline")
    beam: int = opt(5, "beam size for evaluation and translation")
    lenpen: float = opt(1.0, "length penalty: score / length^lenpen")
    max_len_a: float = opt(1.2, "longest output: a * source length + b")
    max_len_b: int = opt(10, "longest output: a * source length + b")
    bleu_at_end: bool = opt(True, "score the test split with the best checkpoint after training (BLEU; perplexity "
                            "for a language model)")

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
                          "valid_max_sentences", "grad_norms_every", "max_len_a", "max_len_b")
        bad = [t for t in self.trackers if t not in TRACKERS]
        if bad:
            raise ConfigError(f"{p}trackers: got {', '.join(map(repr, bad))}; allowed: {', '.join(TRACKERS)} "
                              "(accelerate's trackers)")
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
        arch, task, data = self.model.arch, self.task, self.data
        if self.train.task not in ("auto", task):
            raise ConfigError(f"train.task: got {self.train.task!r}, but model.arch={arch!r} trains {task!r}; "
                              f"leave train.task at 'auto'")
        if arch == "decoder_only" and data.vocab_size < 260 and not data.prepared:
            raise ConfigError(f"data.vocab_size: got {data.vocab_size}; a language model's byte-level BPE needs at "
                              "least 260 (4 special tokens and the 256 bytes)")
        if data.source == "files" and not data.prepared:
            if arch == "decoder_only" and data.train_text is None:
                raise ConfigError("data.train_text: required for model.arch='decoder_only' with data.source='files' "
                                  "(and data.valid_text)")
            if arch == "encoder_decoder" and data.train_text is not None:
                raise ConfigError("data.train_text: text for a language model, but model.arch='encoder_decoder'; "
                                  "give model.arch=decoder_only, or data.train_src/train_tgt for translation")

    @property
    def task(self) -> str:
        """The task ``train.task`` names, or the one ``model.arch`` implies (``auto``)."""
        return "language_model" if self.model.arch == "decoder_only" else "translation"


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """YAML file (or the built-in defaults) plus dotted overrides, validated."""
    base = read_yaml_mapping(path) if path is not None else {}
    return RunConfig.from_dict(apply_overrides(base, list(overrides)))
