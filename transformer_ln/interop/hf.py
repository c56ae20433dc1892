"""Hugging Face checkpoints in and out: GPT-2 (``GPT2LMHeadModel``) and LLaMA (``LlamaForCausalLM``) <-> ``CausalLM``.

    model = from_hf("path/to/checkpoint")        # a LOCAL directory (config.json + weights), or a built HF model
    to_hf(model, "out/dir")                      # save_pretrained: from_pretrained(local_files_only=True) loads it

Both families are Pre-LN stacks of our sub-layers (``ModelConfig(preset="gpt2" | "llama")``); one table per family
names, for every weight of ours, the Hugging Face weights it is made of:

    GPT-2   c_attn -> qkv_proj, c_proj -> out_proj, c_fc -> fc1, mlp.c_proj -> fc2  (Conv1D (in, out): transposed)
            ln_1 / ln_2 / ln_f -> self_attn.pre_norm / ffn.pre_norm / final_norm, wte / wpe -> embed_tokens / learned
    LLaMA   [q_proj; k_proj; v_proj] -> qkv_proj, o_proj -> out_proj, [gate_proj; up_proj] -> fc1, down_proj -> fc2
            input_layernorm / post_attention_layernorm / norm -> the norms; both already in rotate_half layout

What the model cannot hold is refused with a ValueError naming the setting (other model types, grouped-query
attention, scaled RoPE, GPT-2's per-layer attention scaling...). Dropout rates are training-only: those the other side
has no place for are dropped with a warning. ``transformers`` is imported only when a function runs.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..config.run_config import ModelConfig
from ..model.causal_lm import CausalLM

INSTALL = "pip install transformer_ln[hf]"
FAMILIES = ("gpt2", "llama")
# Hugging Face's GPT-2 activation_function -> ours; and ours -> the name to_hf writes
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
                    "gelu": "gelu", "gelu_python": "gelu", "relu": "relu"}
GPT2_ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _transformers():
    try:
        import transformers
    except ImportError as e:  # the optional extra
        raise ImportError(f"transformer_ln.interop needs the transformers package; install it: {INSTALL}") from e
    return transformers


def _refuse(what: str, got, why: str) -> ValueError:
    return ValueError(f"{what}: got {got!r}; {why}")


# --------------------------------------------------------------------------------------------------------------
# the weight tables: (our key, the Hugging Face keys it is the row-concatenation of, Conv1D-transposed)


def _gpt2_table(n_layers: int, tied: bool) -> list[tuple[str, tuple[str, ...], bool]]:
    rows = [("embed.embed_tokens.weight", ("transformer.wte.weight",), False),
            ("embed.learned.weight", ("transformer.wpe.weight",), False)]
    parts = (("self_attn.pre_norm", "ln_1", False), ("self_attn.branch.qkv_proj", "attn.c_attn", True),
             ("self_attn.branch.out_proj", "attn.c_proj", True), ("ffn.pre_norm", "ln_2", False),
             ("ffn.branch.fc1", "mlp.c_fc", True), ("ffn.branch.fc2", "mlp.c_proj", True))
    for i in range(n_layers):
        for ours, theirs, conv1d in parts:
            rows.append((f"layers.{i}.{ours}.weight", (f"transformer.h.{i}.{theirs}.weight",), conv1d))
            rows.append((f"layers.{i}.{ours}.bias", (f"transformer.h.{i}.{theirs}.bias",), False))
    rows += [("final_norm.weight", ("transformer.ln_f.weight",), False),
             ("final_norm.bias", ("transformer.ln_f.bias",), False)]
    if not tied:
        rows.append(("lm_head.weight", ("lm_head.weight",), False))
    return rows


def _llama_table(n_layers: int, tied: bool, bias: bool) -> list[tuple[str, tuple[str, ...], bool]]:
    rows = [("embed.embed_tokens.weight", ("model.embed_tokens.weight",), False)]
    linears = (("self_attn.branch.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("self_attn.branch.out_proj", ("self_attn.o_proj",)),
               ("ffn.branch.fc1", ("mlp.gate_proj", "mlp.up_proj")), ("ffn.branch.fc2", ("mlp.down_proj",)))
    for i in range(n_layers):
        h = f"model.layers.{i}."
        rows.append((f"layers.{i}.self_attn.pre_norm.weight", (h + "input_layernorm.weight",), False))
        rows.append((f"layers.{i}.ffn.pre_norm.weight", (h + "post_attention_layernorm.weight",), False))
        for ours, theirs in linears:
            for kind in ("weight", "bias") if bias else ("weight",):
                rows.append((f"layers.{i}.{ours}.{kind}", tuple(f"{h}{t}.{kind}" for t in theirs), False))
    rows.append(("final_norm.weight", ("model.norm.weight",), False))
    if not tied:
        rows.append(("lm_head.weight", ("lm_head.weight",), False))
    return rows


def _table(family: str, cfg: ModelConfig):
    if family == "gpt2":
        return _gpt2_table(cfg.n_dec_layers, cfg.tie_embeddings)
    return _llama_table(cfg.n_dec_layers, cfg.tie_embeddings, cfg.bias)


# --------------------------------------------------------------------------------------------------------------
# Hugging Face config -> ModelConfig


def _rope(config) -> float:
    """LLaMA's rope_theta, from ``rope_parameters`` (transformers 5) or the older ``rope_theta``/``rope_scaling``;
    anything but plain RoPE is refused."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    kind = params.get("rope_type", params.get("type"))
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", kind))
    if kind not in (None, "default"):
        raise _refuse("rope_scaling / rope_parameters['rope_type']", kind,
                      "only plain RoPE ('default') is supported, not scaled or extended variants")
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise _refuse("partial_rotary_factor", partial, "RoPE over every dimension of a head (1.0) only")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return 10000.0 if theta is None else float(theta)


def _gpt2_config(c) -> dict:
    act = c.activation_function
    if act not in GPT2_ACTIVATIONS:
        raise _refuse("activation_function", act, f"supported: {', '.join(GPT2_ACTIVATIONS)}")
    for name, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if getattr(c, name, want) != want:
            raise _refuse(name, getattr(c, name), f"only {want} is supported (our attention is softmax(q k^T / "
                          "sqrt(d_head)) in the activations' dtype, without cross-attention)")
    if c.embd_pdrop != c.resid_pdrop:
        warnings.warn(f"from_hf: embd_pdrop={c.embd_pdrop} differs from resid_pdrop={c.resid_pdrop}; our model has "
                      f"one dropout rate for both and takes resid_pdrop (training only)", stacklevel=3)
    return dict(preset="gpt2", d_model=c.n_embd, n_heads=c.n_head, d_ff=c.n_inner or 4 * c.n_embd,
                n_dec_layers=c.n_layer, tgt_vocab_size=c.vocab_size, max_positions=c.n_positions,
                norm_eps=c.layer_norm_epsilon, activation=GPT2_ACTIVATIONS[act], bias=True,
                tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)), dropout=c.resid_pdrop,
                attn_dropout=c.attn_pdrop, act_dropout=0.0)


def _llama_config(c) -> dict:
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    if kv != heads:
        raise _refuse("num_key_value_heads", kv, f"must equal num_attention_heads={heads}: grouped-query attention "
                      "(GQA/MQA) is not supported yet")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if head_dim * heads != c.hidden_size:
        raise _refuse("head_dim", head_dim, f"must be hidden_size / num_attention_heads = {c.hidden_size // heads}")
    if c.hidden_act != "silu":
        raise _refuse("hidden_act", c.hidden_act, "LLaMA's SwiGLU ('silu') only")
    attn_bias, mlp_bias = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
    if attn_bias != mlp_bias:
        raise _refuse("attention_bias / mlp_bias", (attn_bias, mlp_bias), "our model.bias puts biases on every "
                      "projection or none; give both the same value")
    return dict(preset="llama", d_model=c.hidden_size, n_heads=heads, d_ff=c.intermediate_size,
                n_dec_layers=c.num_hidden_layers, tgt_vocab_size=c.vocab_size,
                max_positions=c.max_position_embeddings, norm_eps=c.rms_norm_eps, rope_theta=_rope(c),
                bias=attn_bias, tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)), dropout=0.0,
                attn_dropout=float(getattr(c, "attention_dropout", 0.0) or 0.0), act_dropout=0.0)


def model_config_from_hf(config) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face GPT-2 or LLaMA config; a ValueError naming what it cannot hold."""
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise _refuse("model_type", family, f"from_hf converts {' and '.join(FAMILIES)} checkpoints only")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse("is_encoder_decoder", True, "decoder-only models only")
    return ModelConfig(**(_gpt2_config(config) if family == "gpt2" else _llama_config(config)))


# --------------------------------------------------------------------------------------------------------------
# from_hf


def _load(tf, path: Path, dtype):
    if not (path / "config.json").is_file():
        raise ValueError(f"from_hf: {str(path)!r} is not a local Hugging Face checkpoint directory (no config.json "
                         f"there); only local directories are read, nothing is downloaded from the hub")
    model_config_from_hf(tf.AutoConfig.from_pretrained(str(path), local_files_only=True))  # refuse before loading
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return tf.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **{key: dtype or "auto"})


def from_hf(path_or_model, dtype: torch.dtype | None = None) -> CausalLM:
    """Our ``CausalLM`` with the weights of a Hugging Face GPT-2 or LLaMA causal LM.

    ``path_or_model``: a local checkpoint directory (read with ``local_files_only=True``), or a built
    ``GPT2LMHeadModel`` / ``LlamaForCausalLM``. ``dtype``: of our model's weights (None: the checkpoint's). The
    result is on the Hugging Face model's device, in eval mode for a directory (as ``from_pretrained``), else in the
    given model's mode. Its ``cfg`` is the ``ModelConfig`` (``preset`` gpt2 or llama, ``residual`` pre_ln); the
    checkpoint's bos/eos/pad ids are kept in ``model.hf_token_ids`` for ``to_hf``.
    """
    tf = _transformers()
    if isinstance(path_or_model, (str, os.PathLike)):
        hf, training = _load(tf, Path(path_or_model), dtype), False
    elif isinstance(path_or_model, torch.nn.Module) and hasattr(path_or_model, "config"):
        hf, training = path_or_model, path_or_model.training
    else:
        raise TypeError(f"from_hf: expected a checkpoint directory or a Hugging Face model, got "
                        f"{type(path_or_model).__name__}")
    cfg = model_config_from_hf(hf.config)
    if getattr(hf, "lm_head", None) is None:
        raise _refuse("model class", type(hf).__name__, "give the language model with its head (GPT2LMHeadModel, "
                      "LlamaForCausalLM)")
    table = _table(cfg.preset, cfg)
    state = hf.state_dict()
    used = {k for _, theirs, _ in table for k in theirs}
    missing = sorted(used - set(state))
    unplaced = sorted({name for name, _ in hf.named_parameters()} - used)
    if missing or unplaced:
        raise ValueError(f"from_hf: the {type(hf).__name__} does not have the expected weights (missing: "
                         f"{missing[:5]}, not placed: {unplaced[:5]}); is it a plain {cfg.preset} causal LM?")
    dtype = dtype or next(hf.parameters()).dtype
    weights = {}
    for ours, theirs, conv1d in table:
        parts = [state[k].detach().t() if conv1d else state[k].detach() for k in theirs]
        w = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        weights[ours] = w.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = CausalLM(cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"from_hf: no weights for {left}")
    model.hf_token_ids = {k: getattr(hf.config, k, None) for k in TOKEN_IDS}
    return model.train(training)


# --------------------------------------------------------------------------------------------------------------
# to_hf


def _family(model) -> str:
    """gpt2 or llama, whichever ``model`` is shaped as; a ValueError naming the first field neither can hold."""
    if not isinstance(model, CausalLM):
        raise _refuse("to_hf: model", type(model).__name__, "a decoder-only CausalLM only (Hugging Face's GPT-2 "
                      "and LLaMA); the encoder-decoder has no such checkpoint")
    cfg = model.cfg
    why = "Hugging Face's GPT-2 and LLaMA"

    def need(field: str, ok: bool, what: str) -> None:
        if not ok:
            raise _refuse(f"to_hf: model.{field}", getattr(cfg, field), f"{why} {what}")

    need("residual", cfg.residual == "pre_ln" and model.scheme.name == "pre_ln",
         "are Pre-LN ('pre_ln') only; other residual schemes have no Hugging Face checkpoint")
    need("scale_embeddings", not cfg.scale_embeddings, "add positions to unscaled token embeddings (False)")
    need("branch_scale", getattr(cfg, "branch_scale", "none") == "none", "add each branch unscaled ('none')")
    need("qk_norm", not getattr(cfg, "qk_norm", False), "have no norm on queries and keys (False)")
    need("positions", cfg.positions in ("learned", "rope"), "have learned positions (GPT-2) or RoPE (LLaMA)")
    if cfg.positions == "learned":
        why = "Hugging Face's GPT-2 (learned positions)"
        need("norm", cfg.norm == "layernorm", "uses LayerNorm ('layernorm')")
        need("activation", cfg.activation in GPT2_ACTIVATION_NAMES, f"has {', '.join(GPT2_ACTIVATION_NAMES)}")
        need("bias", cfg.bias, "has biases on every projection (True)")
        return "gpt2"
    why = "Hugging Face's LLaMA (rotary positions)"
    need("norm", cfg.norm == "rmsnorm", "uses RMSNorm ('rmsnorm')")
    need("activation", cfg.activation == "swiglu", "uses SwiGLU ('swiglu')")
    return "llama"


def _dropped(cfg: ModelConfig, fields: tuple[str, ...], family: str) -> None:
    lost = [f"{f}={getattr(cfg, f)}" for f in fields if getattr(cfg, f)]
    if lost:
        warnings.warn(f"to_hf: {family} has no place for {', '.join(lost)} (training-only dropout); not saved",
                      stacklevel=3)


def hf_config_of(model: CausalLM, **overrides):
    """The Hugging Face config (``GPT2Config`` or ``LlamaConfig``) of a gpt2- or llama-shaped ``CausalLM``."""
    tf = _transformers()
    family, cfg = _family(model), model.cfg
    ids = {k: v for k, v in getattr(model, "hf_token_ids", {}).items() if k in TOKEN_IDS}
    common = dict({k: None for k in TOKEN_IDS}, **ids, vocab_size=cfg.tgt_vocab_size,
                  tie_word_embeddings=cfg.tie_embeddings)
    if family == "gpt2":
        _dropped(cfg, ("act_dropout",), family)
        kw = dict(n_positions=cfg.max_positions, n_embd=cfg.d_model, n_layer=cfg.n_dec_layers, n_head=cfg.n_heads,
                  n_inner=cfg.d_ff, activation_function=GPT2_ACTIVATION_NAMES[cfg.activation],
                  resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
                  layer_norm_epsilon=cfg.norm_eps)
        return tf.GPT2Config(**{**common, **kw, **overrides})
    _dropped(cfg, ("dropout", "act_dropout"), family)
    kw = dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_dec_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, hidden_act="silu",
              max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
              attention_bias=cfg.bias, mlp_bias=cfg.bias, attention_dropout=cfg.attn_dropout)
    return tf.LlamaConfig(**{**common, **kw, **overrides})


def to_hf(model: CausalLM, path: str | os.PathLike, **config_overrides) -> Path:
    """Save a pre_ln gpt2- or llama-shaped ``CausalLM`` as a Hugging Face checkpoint directory (``save_pretrained``,
    safetensors) in the model's dtype; returns the directory.

    ``config_overrides`` go into the Hugging Face config (``eos_token_id=...``). A model Hugging Face cannot
    represent (another residual scheme, sinusoidal positions, scaled embeddings, a norm or activation the family
    lacks, extra weights such as Sub-LN's inner norms) is refused with a ValueError naming the field.
    """
    tf = _transformers()
    config = hf_config_of(model, **config_overrides)
    family, cfg = _family(model), model.cfg
    table = _table(family, cfg)
    state = model.state_dict()
    unplaced = sorted(set(state) - {ours for ours, _, _ in table})
    if unplaced:
        raise ValueError(f"to_hf: weights {unplaced[:5]} have no place in a Hugging Face {family} checkpoint")
    out = {}
    for ours, theirs, conv1d in table:
        for key, part in zip(theirs, state[ours].detach().chunk(len(theirs), 0)):
            out[key] = (part.t() if conv1d else part).contiguous()
    if cfg.tie_embeddings:
        out["lm_head.weight"] = state["embed.embed_tokens.weight"]
    dtype = model.output_weight().dtype
    hf = (tf.GPT2LMHeadModel if family == "gpt2" else tf.LlamaForCausalLM)(config).to(dtype)
    result = hf.load_state_dict(out, strict=False)
    missing = sorted({name for name, _ in hf.named_parameters()} - set(out))
    if result.unexpected_keys or missing:
        raise RuntimeError(f"to_hf: the {type(hf).__name__} of this transformers version has other weights "
                           f"(not filled: {missing[:5]}, unknown: {result.unexpected_keys[:5]})")
    path = Path(path)
    hf.save_pretrained(str(path))
    return path
