"""``transformer-ln analyze dependency|output-change|gradients|<depth commands>|curves``: JSON and figures in ``--out``.

A model comes either from a run directory (``--run DIR``, its best checkpoint) or is freshly initialised from the
default config plus dotted overrides (``model.n_enc_layers=6 model.residual=admin``); Admin with profiled omega is
profiled on the measurement batch first. A run is measured on its first ``--batch-size`` (16) validation pairs
(blocks; read by ``evaluation.run_batch``, passed in), random ids only with ``--random-ids``; fresh models on seeded
random tokens: (src, tgt_in) pairs for the encoder-decoder, packed blocks (no padding) for a decoder-only model,
whose one stack is "decoder". The batch is named ("valid[:16], 16 sentence pairs", "random ids 4x20") above the
table, in the JSON (``"batch"``) and in every figure title.
``--seeds K`` repeats a measurement with seeds seed..seed+K-1 (model init, perturbation, dropout) and reports the
mean and its 95% interval; ``output-change`` states its definition (``--preset ours|reference`` and the options that
override it) in the JSON and the figure.
``--hf DIR --text FILE`` runs every analysis command on a local Hugging Face model instead, the text's lines as the
batch (``hf_cli``); the depth commands (hidden-states, angular, layer-removal, attention-logits, log-partition:
``depth_cli``) run on any of the three sources.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_text
from ..config.parser import Parser, add_config_arguments, config_from_arguments
from ..config.run_config import RESIDUALS, ModelConfig
from ..errors import UserError
from ..runs.rundir import RunDir
from .output_change import (DEFAULT_EPS, DISTANCES, MASKS, PADDINGS, PERTURBATIONS, PRESETS, READS, Definition,
                            definition)
from .batch import measured_on
from .tables import curves_table, dependency_table, depth_sweep_table, grad_norms_table, output_change_table
from .depth_cli import HELP as DEPTH_HELP
from .depth_cli import add_arguments as add_depth_arguments
from .hf_cli import add_arguments as add_hf_arguments

VALID_SENTENCES = 16  # a run is measured on the first 16 pairs (blocks) of its validation split by default
RANDOM_SHAPE = (4, 20)  # fresh models (or --random-ids): 4 random sentences (blocks) of 20 tokens by default
FIELDS_SET_BY_SWEEP = ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "d_ff", "n_enc_layers",
                       "n_dec_layers", "residual")


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, dest="overrides")  # for a fresh model, e.g. model.residual=admin
    p.add_argument("--run", type=Path, help="a run directory: analyse its checkpoint instead of a fresh model")
    p.add_argument("--which", default=RunDir.BEST, help="which checkpoint of --run (default: best)")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and the figures")
    p.add_argument("--residuals", type=_csv(str), help=f"schemes for fresh models (default: all of {RESIDUALS}, "
                                                       "or the one given as model.residual=... or by model.preset)")
    p.add_argument("--vocab", type=int, default=1000, help="vocabulary size of a fresh model (default 1000)")
    p.add_argument("--batch-size", type=int, help=f"sentences (blocks) in the batch (default: the first "
                   f"{VALID_SENTENCES} of a run's validation split, {RANDOM_SHAPE[0]} random ones)")
    p.add_argument("--seq-len", type=int, help=f"tokens per random sentence (block) (default {RANDOM_SHAPE[1]})")
    p.add_argument("--random-ids", action="store_true", help="measure a --run on random token ids instead of its "
                   "validation sentences")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, batch and noise (default 0)")


HELP = {"dependency": "residual-branch dependency beta_{i,j} heatmaps",
        "output-change": "|F(x,W)-F(x,W*)| under a small weight perturbation (--depths: sweep over depth)",
        "gradients": "relative gradient norms per sub-layer",
        **DEPTH_HELP,
        "curves": "overlay the training curves of run directories"}


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand (options and overrides may be interleaved)."""
    p = Parser(prog=f"transformer-ln analyze {command}", description=HELP[command])
    if command == "curves":
        p.add_argument("runs", nargs="+", type=Path, help="run directories holding metrics.jsonl")
        p.add_argument("--out", type=Path, required=True, help="folder for the JSON and the figures")
        return p
    _common(p)
    add_hf_arguments(p)
    add_depth_arguments(p, command)
    if command in ("dependency", "output-change"):
        p.add_argument("--seeds", type=int, default=1, help="repeat with seeds seed..seed+K-1 (model init, "
                       "perturbation, dropout) and report the mean and its 95%% interval (default 1)")
    if command == "output-change":
        p.add_argument("--depths", type=_csv(int), help="layer counts for a depth sweep of the encoder (a "
                       "decoder-only model: the decoder), e.g. 1,2,4,8,16")
        p.add_argument("--eps", type=float, help="perturbation size per weight (default: the reference's, 1e-4 "
                                                  "random, 1e-6 grad_sign)")
        p.add_argument("--perturbation", choices=PERTURBATIONS, default="random",
                       help="random signs (default) or the sign of the gradient (Adam's first step)")
        p.add_argument("--samples", type=int, default=1, help="random perturbations averaged (default 1)")
        p.add_argument("--preset", choices=tuple(PRESETS), default="ours",
                       help="ours: squared norm, stack output, eval mode, pads skipped, both stacks; reference: "
                            "Transformer-Clinic's plot_stability (l2, before the final norm, train mode, pads "
                            "included, encoder; a decoder-only model's decoder)")
        p.add_argument("--norm", choices=DISTANCES, help="override the preset's norm")
        p.add_argument("--read", choices=READS, help="override where F is read")
        p.add_argument("--mode", help="override the preset's mode: eval or train (dropout on)")
        p.add_argument("--padding", choices=PADDINGS, help="override whether pad positions count")
        p.add_argument("--masks", choices=MASKS, help="train mode: fresh dropout masks per pass (the reference) or "
                                                      "shared ones (dropout on, its noise cancels)")
    return p


def usage() -> str:
    width = max(map(len, HELP))
    lines = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in HELP.items())
    return (f"usage: transformer-ln analyze COMMAND [--run DIR | --hf DIR --text FILE | OVERRIDES...] --out DIR "
            f"[options]\n\ncommands:\n{lines}\n\nModels: --run DIR, a run of ours, on its first {VALID_SENTENCES} "
            f"validation sentences (--random-ids: random ones);\n--hf DIR --text FILE, a local Hugging Face model "
            f"(GPT-2, LLaMA/Mistral/Qwen2, BERT/RoBERTa,\nBART/Marian, T5) on the text's lines; neither: fresh models "
            f"of ours on a random batch.\nRun `transformer-ln analyze COMMAND --help` for a command's options.")


# ---------------------------------------------------------------------------------------------------------------


def _fresh_config(args) -> tuple[ModelConfig, list[str]]:
    model = config_from_arguments(args.overrides).model  # the model `train` would build from these arguments
    if model.src_vocab_size is None or model.tgt_vocab_size is None:
        model = dataclasses.replace(model, src_vocab_size=model.src_vocab_size or args.vocab,
                                    tgt_vocab_size=model.tgt_vocab_size or args.vocab)
    if args.residuals:
        schemes = args.residuals
    elif any(o.startswith(("model.residual=", "model.preset=")) for o in args.overrides):
        schemes = [model.residual]  # the one given, or the preset's
    else:
        schemes = list(RESIDUALS)
    bad = [s for s in schemes if s not in RESIDUALS]
    if bad:
        raise UserError(f"--residuals: unknown scheme(s) {', '.join(bad)}; allowed: {', '.join(RESIDUALS)}")
    return model, schemes


def _batch(args, model, device) -> dict[str, torch.Tensor]:
    """The random batch of the format ``model`` reads (``random_batch_for``), seeded by ``--seed``."""
    from .batch import random_batch_for

    cfg = model.cfg
    size, length = _random_shape(args)
    if not 1 <= length <= cfg.max_positions or size < 1:
        raise UserError(f"--seq-len {length} / --batch-size {size}: need 1 <= seq-len <= "
                        f"model.max_positions={cfg.max_positions} and batch-size >= 1")
    return random_batch_for(model, size, length, args.seed, device=device)


def _random_shape(args) -> tuple[int, int]:  # (sentences, tokens): --batch-size and --seq-len, or RANDOM_SHAPE
    return tuple(RANDOM_SHAPE[k] if v is None else v for k, v in enumerate((args.batch_size, args.seq_len)))


def _run_batch(args, model, run_cfg, device) -> dict:
    """A run's batch: its first ``--batch-size`` validation pairs (blocks), or random ids with ``--random-ids``."""
    if args.random_ids:
        return _batch(args, model, device)
    if args.seq_len is not None:
        raise UserError("--seq-len: a run is measured on its validation sentences, which have their own lengths; "
                        "add --random-ids to measure it on random token ids of that length")
    if getattr(args, "valid_batch", None) is None:
        raise UserError("--run: this entry cannot read the run's validation sentences; use `transformer-ln analyze` "
                        "(transformer_ln.evaluation.run_batch.analyze_main), or add --random-ids")
    n = VALID_SENTENCES if args.batch_size is None else args.batch_size
    return args.valid_batch(args.run, run_cfg, n, device)


def _seeds(args) -> list[int]:
    if args.seeds < 1:
        raise UserError(f"--seeds: got {args.seeds}, need at least 1")
    return [args.seed + k for k in range(args.seeds)]


def models(args, seed: int | None = None):
    """Yield ``(label, scheme, model, batch, checkpoint)``: the run's checkpoint, or one fresh model per scheme
    (``build_model``: the encoder-decoder or the ``CausalLM``, as ``model.arch`` says). The batch is the run's first
    validation sentences, or a random one of the model's format (``batch_inputs`` reads it), named by its
    ``"about"``; what was measured (``measured_on``) is printed once.

    ``seed`` (default ``--seed``) seeds a fresh model's init and calibration; the batch always comes from ``--seed``.
    """
    from tqdm.auto import tqdm

    from ..model.causal_lm import build_model
    from .batch import batch_inputs

    seed = args.seed if seed is None else seed
    if args.run is not None:
        if args.overrides or args.residuals:
            raise UserError("--run analyses a trained model; drop the overrides / --residuals (they are for fresh "
                            "models)")
        if not args.run.is_dir():
            raise UserError(f"--run {args.run}: not a directory")
        from ..runs.checkpoint import load_model  # imported lazily: only checkpoint users need it

        model, run_cfg = load_model(args.run, which=args.which)
        device = next(model.parameters()).device
        batch = _run_batch(args, model, run_cfg, device)
        checkpoint = f"{args.run.name}:{args.which}"
        _announce(args, measured_on(batch, checkpoint))
        yield model.cfg.residual, model.cfg.residual, model, batch, checkpoint
        return
    cfg, schemes = _fresh_config(args)
    for scheme in tqdm(schemes, desc="schemes", disable=len(schemes) < 2):
        mcfg = dataclasses.replace(cfg, residual=scheme)
        torch.manual_seed(seed)
        model = build_model(mcfg)
        batch = _batch(args, model, "cpu")  # its own generator: the model's init is not disturbed
        model.scheme.calibrate(model, *batch_inputs(batch)[0], seed=seed)
        _announce(args, measured_on(batch, "init"))
        yield scheme, scheme, model.eval(), batch, "init"


def _announce(args, what: str) -> None:  # "measured on: ..." once per command, above its table
    if getattr(args, "_announced", None) != what:
        print(f"measured on: {what}")
        args._announced = what


def _definition(args) -> Definition:
    if args.mode in ("random", "grad_sign"):
        raise UserError(f"--mode {args.mode}: --mode is now eval or train; the perturbation kind is "
                        f"--perturbation {args.mode}")
    if args.mode not in (None, "eval", "train"):
        raise UserError(f"--mode: got {args.mode!r}, allowed: eval, train")
    return definition(args.preset, norm=args.norm, read=args.read, mode=args.mode, padding=args.padding,
                      masks=args.masks)


def _stacks_of(defn: Definition, model) -> Definition:
    """``defn`` itself if it names a stack the model has; else the same definition on the model's stacks (the
    reference preset's encoder becomes a decoder-only model's decoder), with a note on stdout."""
    from .hooks import sublayers

    have = tuple(sublayers(model))
    if set(defn.stacks) & set(have):
        return defn
    print(f"note: the definition measures the {', '.join(defn.stacks)}; this model has only the {', '.join(have)}, "
          f"so that is measured")
    return dataclasses.replace(defn, stacks=have)


def _to_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def write_json(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(_to_json(obj), indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------------


def cmd_dependency(args) -> list[Path]:
    from .batch import batch_inputs
    from .dependency import residual_dependency
    from .plotting import plot_dependency
    from .stats import mean_ci95, mean_ci95_along

    runs: dict[str, list] = {}
    checkpoint = "init"
    for seed in _seeds(args):
        for label, _, model, batch, checkpoint in models(args, seed):
            runs.setdefault(label, []).append(residual_dependency(model, *batch_inputs(batch)[0]))
    betas, results = {}, {}
    for label, per_seed in runs.items():
        betas[label], results[label] = {}, {}
        for stack in per_seed[0]:
            stacked = np.stack([b[stack] for b in per_seed])  # (seeds, n, n+1)
            stats = mean_ci95_along(stacked)  # (3, n, n+1): mean, low, high
            betas[label][stack] = stats[0]
            diag = [mean_ci95(col) for col in np.diagonal(stacked, 1, axis1=1, axis2=2).T]
            results[label][stack] = {"beta": stats[0], "ci95_low": stats[1], "ci95_high": stats[2],
                                     "diagonal": [d[0] for d in diag], "diagonal_ci95": [[d[1], d[2]] for d in diag]}
    record = {"checkpoint": checkpoint, "batch": batch["about"], "seeds": _seeds(args), "results": results}
    print(dependency_table(results))
    title = measured_on(batch, checkpoint) + ("" if args.seeds == 1 else f", mean of {args.seeds} seeds")
    return [write_json(record, args.out / "dependency.json"), *plot_dependency(betas, args.out / "dependency", title)]


def cmd_output_change(args) -> list[Path]:
    from .batch import batch_inputs
    from .output_change import output_change
    from .plotting import plot_output_change, plot_output_change_bars
    from .stats import keys_ci95

    defn = _definition(args)
    if args.eps is None:
        args.eps = DEFAULT_EPS[args.perturbation]
    if args.depths:
        if args.run is not None:
            raise UserError("--depths sweeps freshly initialised models; it cannot be combined with --run")
        from .depth_sweep import depth_sweep

        cfg, schemes = _fresh_config(args)
        extra = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FIELDS_SET_BY_SWEEP}
        size, length = _random_shape(args)
        sweep = depth_sweep(schemes, args.depths, d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
                            vocab_size=cfg.src_vocab_size, batch_size=size, seq_len=length,
                            eps=args.eps, perturbation=args.perturbation, n_samples=args.samples, seed=args.seed,
                            seeds=args.seeds, definition=defn, **extra)
        sweep["batch"] = f"random ids {size}x{length}" + (f", seed {args.seed}" if args.seed else "")
        print(f"measured on: init, {sweep['batch']}")
        print(depth_sweep_table(sweep))
        return [write_json(sweep, args.out / "output_change.json"),
                *plot_output_change(sweep, args.out / "output_change", f"init, {sweep['batch']}")]
    per_seed: dict[str, list[dict[str, float]]] = {}
    checkpoint = "init"
    for seed in _seeds(args):
        for label, _, model, batch, checkpoint in models(args, seed):
            defn = _stacks_of(defn, model)
            inputs, target = batch_inputs(batch)
            per_seed.setdefault(label, []).append(
                output_change(model, *inputs, eps=args.eps, perturbation=args.perturbation,
                              n_samples=args.samples, seed=seed, tgt_out=target, preset=defn))
    changes, ci95 = {}, {}
    for label, rows in per_seed.items():
        changes[label], ci95[label] = keys_ci95(rows)
    record = {"checkpoint": checkpoint, "batch": batch["about"], "definition": defn.as_dict(),
              "perturbation": args.perturbation, "eps": args.eps, "seeds": _seeds(args), "results": changes,
              "ci95": ci95, "per_seed": per_seed}
    print(output_change_table(changes, ci95 if len(_seeds(args)) > 1 else None, defn.describe()))
    return [write_json(record, args.out / "output_change.json"),
            *plot_output_change_bars(changes, args.out / "output_change", measured_on(batch, checkpoint), ci95=ci95,
                                     definition=defn.describe())]


def cmd_gradients(args) -> list[Path]:
    from .batch import batch_inputs
    from .grad_norms import gradient_norms
    from .plotting import plot_grad_norms

    norms, checkpoint = {}, "init"
    for label, _, model, batch, checkpoint in models(args):
        inputs, target = batch_inputs(batch)
        norms[label] = gradient_norms(model, *inputs, tgt_out=target)
    print(grad_norms_table(norms))
    return [write_json({"checkpoint": checkpoint, "batch": batch["about"], "results": norms},
                       args.out / "grad_norms.json"),
            *plot_grad_norms(norms, args.out / "grad_norms", measured_on(batch, checkpoint))]


def cmd_curves(args) -> list[Path]:
    from .plotting import plot_curves, read_run

    for run in args.runs:
        if not RunDir(run).metrics.is_file():
            raise UserError(f"{run}: no metrics.jsonl (is it a run directory written by transformer-ln train?)")
    runs = [read_run(r) for r in args.runs]
    record = {"runs": [{"dir": str(d), "name": r["name"], "summary": r["summary"], "n_train": len(r["train"]),
                        "n_valid": len(r["valid"]), "skipped_lines": r["skipped"],
                        "last_train_loss": r["train"][-1].get("loss") if r["train"] else None}
                       for d, r in zip(args.runs, runs)]}
    print(curves_table(record["runs"]))
    return [write_json(record, args.out / "curves.json"), *plot_curves(runs, args.out / "curves")]


COMMANDS = {"dependency": cmd_dependency, "output-change": cmd_output_change, "gradients": cmd_gradients,
            "curves": cmd_curves}


def main(argv: list[str] | None = None, valid_batch=None) -> int:
    """``transformer-ln analyze``; ``valid_batch`` reads a run's validation sentences (``evaluation.run_batch``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv[0]
    if command not in HELP:
        raise UserError(f"transformer-ln analyze: invalid choice {command!r}; choose one of: {', '.join(HELP)}")
    try:
        args = build_parser(command).parse_intermixed_args(argv[1:])
    except SystemExit as e:  # --help
        return int(e.code or 0)
    args.valid_batch = valid_batch
    if command in DEPTH_HELP or getattr(args, "hf", None) is not None:
        from .depth_cli import run

        paths = run(command, args, models)
    else:
        paths = COMMANDS[command](args)
    for path in paths:
        print(path)
    return 0
