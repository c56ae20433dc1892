"""``transformer-ln analyze COMMAND --hf DIR --text FILE --out DIR``: the analyses on a local Hugging Face model.

The model is read from ``DIR`` with ``from_pretrained(DIR, local_files_only=True)`` (nothing is downloaded), by the
class its ``config.json`` names in ``architectures``: a causal LM (``...ForCausalLM``, ``...LMHeadModel``) through
``AutoModelForCausalLM``, an encoder-decoder (``...ForConditionalGeneration``, ``...MTModel``) through
``AutoModelForSeq2SeqLM``, a masked LM through ``AutoModelForMaskedLM``, anything else through ``AutoModel`` (no
head: no loss, so no layer removal or gradients). Its tokenizer comes from ``DIR`` (or ``--tokenizer``).

The batch is the text file: its first ``--max-lines`` non-empty lines, each one sequence of at most
``--max-length`` tokens (and the model's positions), padded on the right, with an attention mask. An
encoder-decoder reads the same tokens as encoder input and as decoder input (its loss: next-token cross-entropy
on them); a masked LM's loss is its own with the unmasked input ids as labels (how well each token is
reconstructed). ``transformers`` is imported only here, only when ``--hf`` is given.

``sources`` also yields our own models (a ``--run`` checkpoint or fresh ones, through the command line's
``models``), so the depth commands (``depth_cli``, which also dispatches) read every model the same way.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..atomic import write_text
from ..errors import UserError
from .depth_stats import jsonable

INSTALL = "pip install transformer_ln[hf]"
HEADS = (("causal", ("ForCausalLM", "LMHeadModel")), ("seq2seq", ("ForConditionalGeneration", "MTModel",
                                                                   "ForSeq2SeqLM")), ("masked", ("ForMaskedLM",)))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "source.spm")
AUTO = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM", "masked": "AutoModelForMaskedLM",
        "base": "AutoModel"}


def add_arguments(p) -> None:
    """``--hf`` and the options of its text batch."""
    g = p.add_argument_group("a Hugging Face model (instead of --run or a fresh model)")
    g.add_argument("--hf", type=Path, metavar="DIR", help="a local Hugging Face model directory (config.json and "
                   "weights, as save_pretrained writes them; nothing is downloaded)")
    g.add_argument("--text", type=Path, metavar="FILE", help="with --hf: the batch, one sequence per line (UTF-8)")
    g.add_argument("--tokenizer", type=Path, metavar="DIR", help="with --hf: the tokenizer's directory (default: "
                   "the model directory)")
    g.add_argument("--max-lines", type=int, default=16, help="with --hf: read at most this many lines (default 16)")
    g.add_argument("--max-length", type=int, default=64, help="with --hf: tokens per line at most (default 64; "
                   "never more than the model's positions)")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="with --hf: the model's dtype (default float32)")


@dataclass
class Source:
    """One model to analyse: ``label`` (the scheme, or the directory's name), the model, its batch ``inputs``
    (a dict of keyword arguments, or a tuple for ours), ``checkpoint`` for titles ("init", "run:best", "Hugging
    Face"), ``info`` for the JSON (a Hugging Face model's class, head, text, lines, tokens, loss)."""

    label: str
    model: torch.nn.Module
    inputs: Any
    checkpoint: str
    info: dict = field(default_factory=dict)
    loss: str | None = "the family's"  # None: the model has no loss to compare (a Hugging Face model without head)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise UserError(f"--hf needs the transformers package; install it: {INSTALL}") from None
    return transformers


def head_of(architectures) -> str:
    """"causal", "seq2seq", "masked" or "base" for the class names in a config's ``architectures``."""
    for name in architectures or ():
        for head, ends in HEADS:
            if name.endswith(ends):
                return head
    return "base"


def load_model(path: Path, dtype: str = "float32"):
    """``(model, head)`` from a local directory, in eval mode; every failure one ``UserError`` line."""
    if not path.exists():
        raise UserError(f"--hf {path}: no such directory")
    if not (path / "config.json").is_file():
        raise UserError(f"--hf {path}: not a Hugging Face model directory (no config.json); write one with "
                        f"model.save_pretrained('{path}')")
    tf = transformers_module()
    try:
        config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--hf {path}: transformers cannot read its config.json ({_one_line(e)})") from None
    head = head_of(getattr(config, "architectures", None))
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    bars = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()  # stderr keeps to warnings and the one-line error
    try:
        model = getattr(tf, AUTO[head]).from_pretrained(str(path), local_files_only=True,
                                                        **{key: getattr(torch, dtype)})
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"--hf {path}: cannot load it with {AUTO[head]} ({_one_line(e)})") from None
    finally:
        if bars:
            tf.utils.logging.enable_progress_bar()
    return model.eval(), head


def load_tokenizer(path: Path, model_dir: Path):
    """The tokenizer saved in ``path``; one ``UserError`` line when there is none (transformers 5 would build an
    empty one from the config alone)."""
    tf = transformers_module()
    where = "--tokenizer" if path != model_dir else "--hf"
    fix = f"save one with tokenizer.save_pretrained('{path}') or pass --tokenizer DIR"
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{where} {path}: no tokenizer there (none of {', '.join(TOKENIZER_FILES[:3])}, ...); {fix}")
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here; each is one line to the user
        raise UserError(f"{where} {path}: no tokenizer there ({_one_line(e)}); {fix}") from None
    if len(tokenizer) < 2:
        raise UserError(f"{where} {path}: the tokenizer there has an empty vocabulary; {fix}")
    return tokenizer


def _positions(config) -> int | None:
    for attr in ("n_positions", "max_position_embeddings"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def text_batch(tokenizer, model, head: str, text: Path, max_lines: int, max_length: int) -> tuple[dict, dict]:
    """``(inputs, info)``: the padded batch of the text's lines (module docstring) and what went into it."""
    if max_lines < 1 or max_length < 1:
        raise UserError(f"--max-lines {max_lines} / --max-length {max_length}: both must be at least 1")
    if not text.is_file():
        raise UserError(f"--text {text}: no such file")
    lines = [ln.strip() for ln in text.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    lines = lines[:max_lines]
    positions = _positions(model.config)
    length = min(max_length, positions) if positions else max_length
    ids = [list(tokenizer(ln, truncation=True, max_length=length)["input_ids"])[:length] for ln in lines]
    ids = [i for i in ids if i]
    if not ids:
        raise UserError(f"--text {text}: no line with a token in it")
    vocab = model.get_input_embeddings().num_embeddings
    top = max(max(i) for i in ids)
    if top >= vocab:
        raise UserError(f"--text {text}: the tokenizer gives id {top}, the model has {vocab} embeddings; the "
                        "tokenizer does not belong to this model (--tokenizer)")
    pad = next((p for p in (tokenizer.pad_token_id, getattr(model.config, "pad_token_id", None),
                            tokenizer.eos_token_id) if isinstance(p, int) and 0 <= p < vocab), 0)
    width = max(map(len, ids))
    input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if head == "seq2seq":
        inputs.update(decoder_input_ids=input_ids.clone(), decoder_attention_mask=mask.clone())
    if head == "masked":
        inputs["labels"] = input_ids.masked_fill(mask == 0, -100)
    info = {"text": str(text), "lines": len(ids), "tokens": int(mask.sum()), "max_length": length,
            "truncated": sum(len(i) == length for i in ids)}
    return inputs, info


LOSS = {"causal": "next-token cross-entropy on the text", "seq2seq": "next-token cross-entropy of the decoder on "
        "the text (the same tokens as the encoder's input)", "masked": "the masked LM's own loss with the unmasked "
        "input ids as labels", "base": None}


def hf_source(args) -> Source:
    if args.run is not None or args.overrides or args.residuals:
        raise UserError("--hf analyses a Hugging Face model; drop --run, --residuals and the overrides")
    if args.text is None:
        raise UserError("--hf needs --text FILE: the batch, one sequence per line")
    if not args.text.is_file():
        raise UserError(f"--text {args.text}: no such file")
    model, head = load_model(args.hf, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or args.hf, args.hf)
    inputs, info = text_batch(tokenizer, model, head, args.text, args.max_lines, args.max_length)
    arch = type(model).__name__
    info = {"model": str(args.hf), "class": arch, "head": head, "dtype": args.dtype, "loss": LOSS[head], **info}
    return Source(args.hf.resolve().name or str(args.hf), model, inputs, "Hugging Face", info, LOSS[head])


def sources(args, ours: Callable) -> Iterator[Source]:
    """The ``--hf`` model, else our models one at a time (``ours(args)``: the command line's ``models``)."""
    if getattr(args, "hf", None) is not None:
        yield hf_source(args)
        return
    given = [o for o in ("text", "tokenizer") if getattr(args, o, None) is not None]
    if given:
        raise UserError(f"--{given[0]} goes with --hf DIR (our runs read their validation sentences, fresh models "
                        "a random batch)")
    from .batch import batch_inputs, measured_on

    for label, _, model, batch, checkpoint in ours(args):  # titles name the batch too (``measured_on``)
        yield Source(label, model, batch_inputs(batch)[0], measured_on(batch, checkpoint),
                     {"checkpoint": checkpoint, "batch": batch.get("about")})


def attached(src: Source):
    """``attach(src.model)``; an unknown model's ``SitesError`` names the directory."""
    from .families import attach
    from .sites import SitesError

    try:
        return attach(src.model)
    except SitesError as e:
        raise UserError(f"{src.info.get('model', src.label)}: {e}") from None


def need_loss(src: Source, what: str) -> None:
    if src.loss is None:
        raise UserError(f"--hf {src.info.get('model')}: {src.info.get('class')} has no language-model head, so "
                        f"{what} has no loss; save the model with its head (a ...ForCausalLM, ...ForMaskedLM or "
                        f"...ForConditionalGeneration class)")


def write_json(obj: Any, path: Path) -> Path:
    """Strict JSON (NaN and infinities as null, ``jsonable``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")


# --------------------------------------------------------------------------------- the paper's analyses via attach
def dependency(args, src: Source) -> list[Path]:
    from .attached import site_dependency
    from .plotting import plot_dependency
    from .tables import dependency_table

    if args.seeds != 1:
        raise UserError("--seeds: a saved model on a text batch gives one beta (nothing random); drop --seeds")
    sites = attached(src)
    betas = {src.label: site_dependency(sites, src.inputs)}
    results = {src.label: {st: {"beta": b, "diagonal": np.diagonal(b, 1).tolist()}
                           for st, b in betas[src.label].items()}}
    print(dependency_table(results))
    record = {"source": src.info, "sites": sites.describe(), "results": results}
    return [write_json(record, args.out / "dependency.json"),
            *plot_dependency(betas, args.out / "dependency", src.checkpoint)]


def output_change(args, src: Source) -> list[Path]:
    from .attached import site_output_change
    from .output_change import DEFAULT_EPS, definition
    from .plotting import plot_output_change_bars
    from .stats import keys_ci95
    from .tables import output_change_table

    if args.depths:
        raise UserError("--depths sweeps freshly initialised models of ours; it cannot be combined with --hf")
    if args.seeds < 1 or args.samples < 1:
        raise UserError(f"--seeds {args.seeds} / --samples {args.samples}: both must be at least 1")
    try:
        defn = definition(args.preset, norm=args.norm, read=args.read, mode=args.mode, padding=args.padding,
                          masks=args.masks)
    except ValueError as e:
        raise UserError(f"output change definition: {e}") from None
    eps = DEFAULT_EPS[args.perturbation] if args.eps is None else args.eps
    if not math.isfinite(eps) or eps < 0:
        raise UserError(f"--eps {eps}: must be finite and >= 0")
    if args.perturbation == "grad_sign":
        need_loss(src, "the gradient-sign perturbation")
    sites = attached(src)
    have = tuple(sites.stacks())
    if not set(defn.stacks) & set(have):
        print(f"note: the definition measures the {', '.join(defn.stacks)}; this model has only the "
              f"{', '.join(have)}, so that is measured")
    defn = definition(defn, stacks=tuple(s for s in defn.stacks if s in have) or have)
    seeds = [args.seed + k for k in range(args.seeds)]
    rows = [site_output_change(sites, src.inputs, eps, perturbation=args.perturbation, n_samples=args.samples,
                               seed=seed, preset=defn) for seed in seeds]
    mean, ci95 = keys_ci95(rows)
    changes, intervals = {src.label: mean}, {src.label: ci95}
    print(output_change_table(changes, intervals if len(seeds) > 1 else None, defn.describe()))
    record = {"source": src.info, "definition": defn.as_dict(), "perturbation": args.perturbation, "eps": eps,
              "seeds": seeds, "results": changes, "ci95": intervals, "per_seed": {src.label: rows}}
    return [write_json(record, args.out / "output_change.json"),
            *plot_output_change_bars(changes, args.out / "output_change", src.checkpoint,
                                     ci95=intervals if len(seeds) > 1 else None, definition=defn.describe())]


def gradients(args, src: Source) -> list[Path]:
    from .attached import site_gradient_norms
    from .plotting import plot_grad_norms
    from .tables import grad_norms_table

    need_loss(src, "a gradient")
    norms = {src.label: site_gradient_norms(attached(src), src.inputs)}
    print(grad_norms_table(norms))
    return [write_json({"source": src.info, "results": norms}, args.out / "grad_norms.json"),
            *plot_grad_norms(norms, args.out / "grad_norms", src.checkpoint)]


PAPER = {"dependency": dependency, "output-change": output_change, "gradients": gradients}
