"""Output change at initialisation against depth: the paper's O(N) (Post-LN) versus O(log N) (Pre-LN, Admin).

For each scheme, depth L of the swept stack (N = 2L sub-layers) and seed k a fresh model is built (init seed
``seed + k``), calibrated by its scheme (Admin's omega profiled by ``admin_init``, dropout on, as the reference), and
``output_change`` is measured on that stack under a ``Definition`` (perturbation and dropout seeded by
``seed + k`` too). Per depth: the mean over seeds and its 95% interval (Student t). Both y = a*N + b and
y = a*log(N) + b are fitted by least squares, to the means and to every seed's curve; the report gives each
fit's R^2 (on the means, and mean/sd/min/max over seeds) and in how many seeds each fit wins (higher R^2).

The swept stack is the model's first: the encoder of an encoder-decoder (one decoder layer beside it), the decoder
of a decoder-only model (``arch="decoder_only"`` among the model fields; random packed blocks of ids).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..config.run_config import ModelConfig
from ..model.causal_lm import build_model as build_arch
from ..model.schemes import SCHEMES
from .batch import batch_inputs, random_batch_for
from .hooks import pad_masks, sublayers
from .output_change import DEFAULT_EPS, PERTURBATIONS, Definition, output_change
from .output_change import definition as make_definition
from .stats import columns_ci95, fit, fit_over_seeds


DEPTH_FIELDS = {"encoder": "n_enc_layers", "decoder": "n_dec_layers"}  # the config field of each stack's depth


def build_model(residual: str, n_enc_layers: int, d_model: int = 512, n_heads: int = 8, d_ff: int | None = None,
                vocab_size: int = 1000, n_dec_layers: int = 1, dropout: float = 0.1, seed: int = 0,
                batch: dict[str, torch.Tensor] | None = None, **model_kw) -> nn.Module:
    """A freshly initialised model, calibrated by its scheme (Admin's profiling) on ``batch`` or a random one of
    its format (``random_batch_for``). ``model_kw`` are further ``ModelConfig`` fields: ``arch="decoder_only"``
    builds a ``CausalLM`` of ``n_dec_layers`` layers (``n_enc_layers`` unused)."""
    cfg = ModelConfig(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, d_model=d_model, n_heads=n_heads,
                      d_ff=d_ff or 4 * d_model, n_enc_layers=n_enc_layers, n_dec_layers=n_dec_layers,
                      dropout=dropout, residual=residual, **model_kw)
    torch.manual_seed(seed)
    model = build_arch(cfg)
    if batch is None:
        batch = random_batch_for(model, seed=seed)
    model.scheme.calibrate(model, *batch_inputs(batch)[0], seed=seed)
    return model.eval()


def depth_sweep(residuals: Iterable[str] = tuple(SCHEMES),
                depths: Iterable[int] = (1, 2, 4, 8, 16, 32, 50), d_model: int = 512, n_heads: int = 8,
                d_ff: int | None = None, vocab_size: int = 1000, batch_size: int = 4, seq_len: int = 20,
                eps: float | None = None, perturbation: str = "random", n_samples: int = 1, seed: int = 0,
                progress: bool = True, seeds: int = 1,
                definition: str | Definition | list[str | Definition] | tuple = "ours", **model_kw):
    """Output change at initialisation of the swept stack (the encoder; a decoder-only model's decoder) for every
    (scheme, depth, seed); each model is built once.

    ``residuals`` defaults to every registered scheme. ``definition`` is a preset name ("ours", "reference") or a
    ``Definition`` (see ``output_change``; only the swept stack is measured); a list of them measures each on the
    same models and returns a list of sweeps. ``model_kw`` are further ``ModelConfig`` fields (``arch``, ``norm``,
    ``dropout``, ``activation``, ``admin_omega``, ``pad_id``...).

    Returns ``{"config": {...}, "definition": {...}, "results": {scheme: {...}}}``; ``config["stack"]`` names the
    swept stack and ``config["sublayers_per_layer"]`` its sub-layers per layer; each scheme's entry holds
    ``depths``, ``sublayers``, ``output_change`` (mean over seeds), ``ci95`` ([low, high] per depth), ``per_seed``
    (seeds x depths), ``fit`` (on the means), ``fit_seeds`` (``fit_over_seeds``) and ``ratio`` (deepest mean /
    shallowest mean).
    """
    from tqdm.auto import tqdm

    residuals, depths = list(residuals), sorted(set(int(d) for d in depths))
    if not depths or depths[0] < 1:
        raise ValueError(f"depths: got {depths}, need layer counts >= 1")
    if seeds < 1:
        raise ValueError(f"seeds: got {seeds}, must be >= 1")
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation: got {perturbation!r}, allowed: {', '.join(map(repr, PERTURBATIONS))}")
    several = isinstance(definition, (list, tuple))
    eps = DEFAULT_EPS[perturbation] if eps is None else eps
    fixed = {f: model_kw.pop(f, 1) for f in DEPTH_FIELDS.values()}  # the other stack's depth (default 1)
    # a small model of the same config: which stack the sweep deepens, its sub-layers per layer, its batch
    probe = build_arch(ModelConfig(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, d_model=d_model,
                                   n_heads=n_heads, d_ff=d_ff or 4 * d_model, n_enc_layers=1, n_dec_layers=1,
                                   residual=residuals[0] if residuals else "post_ln", **model_kw))
    stack, per_layer = next(iter((s, len(subs)) for s, subs in sublayers(probe).items()))
    defns = [make_definition(d, stacks=(stack,)) for d in (definition if several else [definition])]
    batch = random_batch_for(probe, batch_size, seq_len, seed=seed)
    inputs, target = batch_inputs(batch)
    config = dict(residuals=residuals, depths=depths, d_model=d_model, n_heads=n_heads, d_ff=d_ff or 4 * d_model,
                  vocab_size=vocab_size, batch_size=batch_size, seq_len=seq_len, perturbation=perturbation,
                  eps=eps, n_samples=n_samples, seed=seed, seeds=seeds,
                  n_tokens=int(pad_masks(probe, *inputs)[stack].sum()), stack=stack,
                  sublayers_per_layer=per_layer, **model_kw)
    del probe
    depth_field = DEPTH_FIELDS[stack]
    per_seed = {(k, r): [[] for _ in range(seeds)] for k in range(len(defns)) for r in residuals}
    bar = tqdm(total=len(residuals) * len(depths) * seeds, desc="output change", disable=not progress)
    try:
        for residual in residuals:
            for s in range(seeds):
                for depth in depths:
                    bar.set_postfix(scheme=residual, layers=depth, seed=seed + s)
                    layers = {**fixed, depth_field: depth}
                    model = build_model(residual, layers["n_enc_layers"], d_model, n_heads, d_ff, vocab_size,
                                        n_dec_layers=layers["n_dec_layers"], seed=seed + s, batch=batch, **model_kw)
                    for k, defn in enumerate(defns):
                        change = output_change(model, *inputs, eps=eps, perturbation=perturbation,
                                               n_samples=n_samples, seed=seed + s, tgt_out=target, preset=defn)
                        per_seed[k, residual][s].append(change[stack])
                    del model
                    bar.update()
    finally:
        bar.close()
    sweeps = [{"config": config, "definition": defn.as_dict(),
               "results": {r: _summary(depths, per_seed[k, r], per_layer) for r in residuals}}
              for k, defn in enumerate(defns)]
    return sweeps if several else sweeps[0]


def _summary(depths: list[int], per_seed: list[list[float]], per_layer: int = 2) -> dict:
    sub = [per_layer * d for d in depths]
    means, ci95 = columns_ci95(per_seed)
    return {"depths": depths, "sublayers": sub, "output_change": means, "ci95": ci95,
            "per_seed": per_seed, "fit": fit(sub, means) if len(depths) > 2 else None,
            "fit_seeds": fit_over_seeds(sub, per_seed) if len(depths) > 2 else None,
            "ratio": means[-1] / means[0] if means[0] > 0 else math.inf}
