"""Output change under a small parameter perturbation (Liu et al. 2020, Sec. 3; TC ``--plot_stability``).

    Delta F = |F(x, W) - F(x, W*)|,      W* = W + eps * sign(noise)      (perturbation="random", eps 1e-4)
                                          W* = W - eps * sign(dL/dW)      (perturbation="grad_sign", eps 1e-6)

Perturbed: every parameter except biases, norm parameters and the residual combiners' scales (Admin's omega,
ReZero's alpha), as the reference code; the embedding matrices are weights and do move. The perturbed copies go in
through ``torch.func.functional_call``: the model's own parameters are never written.

Three choices change the numbers (and, for Post-LN's linear versus logarithmic growth, the conclusion), so each is
an option and every result states them (``Definition``):

* ``norm``: ``"squared"`` |.|_2^2 (the paper's figure axis) or ``"l2"`` |.|_2 (what the reference code prints).
* ``read``: ``"stack_output"`` (after Pre-LN's final norm: what the next stack or the output layer sees) or
  ``"before_final_norm"`` (the last sub-layer's output, where the reference's hook sits; the same for schemes
  without a final norm; ResiDual: its two streams side by side).
* ``mode``: ``"eval"`` (deterministic) or ``"train"`` (dropout on in both passes, each with its own masks drawn
  from one stream seeded by ``seed``, as the reference's two forwards).
* ``padding``: ``"skip"`` pad positions or ``"include"`` them (the reference's norm runs over the whole tensor).
* ``masks`` (train mode only): ``"fresh"`` dropout masks for each pass (the reference: its two forwards draw their
  own, so dropout noise enters the difference) or ``"shared"`` (every pass reseeded alike: dropout on, no noise).

``preset="reference"`` is Transformer-Clinic's ``plot_stability``: l2, before the final norm, train mode, padding
included, encoder only. ``preset="ours"`` (the default) is squared, stack output, eval mode, padding skipped, both
stacks (the decoder's change includes what reaches it through the perturbed encoder output).

A decoder-only model (``CausalLM``, called with its ids alone: ``output_change(model, ids)``) has one stack,
"decoder": F is its final hidden states (``model.hidden(ids)``, before the output projection), every position
real. Of the definition's stacks those the model has are measured (``ours``: the decoder); a definition naming
none of them (``reference``: the encoder) is an error that says to pass ``stacks=("decoder",)``.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..model.norms import is_norm
from ..model.schemes import Residual
from ..model.sublayer import stream_tensors
from .hooks import STACKS, model_inputs, pad_masks, registered_hooks, sublayers
from .hooks import mode as train_mode

PERTURBATIONS = ("random", "grad_sign")
DEFAULT_EPS = {"random": 1e-4, "grad_sign": 1e-6}  # the reference's two step sizes
DISTANCES = ("squared", "l2")  # Definition.norm: |ΔF|² or |ΔF|, the distance that measures output change
READS = ("stack_output", "before_final_norm")
MODES = ("eval", "train")
PADDINGS = ("skip", "include")
MASKS = ("fresh", "shared")


@dataclass(frozen=True)
class Definition:
    """What "output change" means: the norm, where F is read, train or eval mode, and whether pads count."""

    norm: str = "squared"
    read: str = "stack_output"
    mode: str = "eval"
    padding: str = "skip"
    stacks: tuple[str, ...] = STACKS
    masks: str = "fresh"

    def __post_init__(self):
        for field, allowed in (("norm", DISTANCES), ("read", READS), ("mode", MODES), ("padding", PADDINGS),
                               ("masks", MASKS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{field}: got {value!r}, allowed: {', '.join(map(repr, allowed))}")
        bad = [s for s in self.stacks if s not in STACKS]
        if bad or not self.stacks:
            raise ValueError(f"stacks: got {self.stacks!r}, allowed: a non-empty subset of {STACKS}")

    def describe(self) -> str:
        """One line for figure titles and logs."""
        norm = "|ΔF|²" if self.norm == "squared" else "|ΔF|"
        read = "stack output" if self.read == "stack_output" else "before final norm"
        pads = "pads skipped" if self.padding == "skip" else "pads included"
        mode = "eval mode" if self.mode == "eval" else f"train mode ({self.masks} dropout masks)"
        return f"{norm}, {read}, {mode}, {pads}"

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "stacks": list(self.stacks), "text": self.describe()}


PRESETS = {"ours": Definition(),
           "reference": Definition(norm="l2", read="before_final_norm", mode="train", padding="include",
                                   stacks=("encoder",))}


def definition(preset: str | Definition | None = None, **options) -> Definition:
    """A ``Definition`` from a preset name (default "ours") with any field overridden by a non-None option."""
    if isinstance(preset, Definition):
        base = preset
    else:
        if (preset or "ours") not in PRESETS:
            raise ValueError(f"preset: got {preset!r}, allowed: {', '.join(map(repr, PRESETS))}")
        base = PRESETS[preset or "ours"]
    given = {k: (tuple(v) if k == "stacks" else v) for k, v in options.items() if v is not None}
    return dataclasses.replace(base, **given)


class _Stacks(nn.Module):
    """Runs the encoder and (optionally) the decoder stack; ``functional_call`` swaps the parameters in. With one
    input (a decoder-only model's ids) the model's one stack: its final hidden states."""

    def __init__(self, model: nn.Module, stacks: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.stacks = stacks

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if tgt_in is None:
            return {self.stacks[0]: self.model.hidden(src)}
        memory = self.model.encode(src)
        out = {"encoder": memory}
        if "decoder" in self.stacks:
            out["decoder"] = self.model.decoder(tgt_in, memory, self.model.key_mask(src))
        return out


def perturbed_names(model: nn.Module) -> list[str]:
    """Names (as in ``named_parameters()``) of the weights that move: not biases, norm params or combiner scales."""
    skip = {id(p) for m in model.modules() for pname, p in m.named_parameters(recurse=False)
            if pname == "bias" or is_norm(m) or isinstance(m, Residual)}
    return [n for n, p in model.named_parameters() if id(p) not in skip]


def default_tgt_out(tgt_in: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Next-token targets when none are given: ``tgt_in`` (or a decoder-only model's ids) shifted left by one, a pad
    appended; the loss ignores it, so logits[:, :-1] are scored against ids[:, 1:]."""
    return F.pad(tgt_in[:, 1:], (0, 1), value=pad_id)


def token_loss(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor | None = None,
               tgt_out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean token cross-entropy over non-pad targets (no label smoothing: the plain NLL) of ``model(src, tgt_in)``,
    or of ``model(ids)`` with ``tgt_in=None``; ``tgt_out`` (aligned with the logits) defaults to next-token targets
    of the decoder's input (``default_tgt_out``)."""
    inputs = model_inputs(src, tgt_in)
    if tgt_out is None:
        tgt_out = default_tgt_out(inputs[-1], model.cfg.pad_id)
    logits = model(*inputs)
    if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax in at least float32
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=model.cfg.pad_id)


def _moved(model: nn.Module, names: list[str], perturbation: str, eps: float, generator: torch.Generator,
           src, tgt_in, tgt_out) -> dict[str, torch.Tensor]:
    """Perturbed copies W* of the named parameters (the originals are only read)."""
    params = dict(model.named_parameters())
    if perturbation == "random":
        # noise drawn on the CPU, so the perturbation does not depend on the device
        signs = (torch.randn(params[n].shape, generator=generator).sign_() for n in names)
    else:
        with torch.enable_grad():
            loss = token_loss(model, src, tgt_in, tgt_out)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        signs = (torch.zeros_like(params[n]) if g is None else -torch.sign(g) for n, g in zip(names, grads))
    return {f"model.{n}": params[n].detach().clone().add_(d.to(params[n].device, params[n].dtype), alpha=eps)
            for n, d in zip(names, signs)}


def _resolve_perturbation(mode: str | None, perturbation: str | None) -> tuple[str, str | None]:
    """Old calls passed the perturbation kind as ``mode``; they keep working, with a warning."""
    if mode in PERTURBATIONS:
        if perturbation not in (None, mode):
            raise ValueError(f"mode={mode!r} (the old name of perturbation) contradicts perturbation="
                             f"{perturbation!r}; mode is now 'eval' or 'train'")
        warnings.warn(f"output_change(mode={mode!r}): the perturbation kind is now perturbation={mode!r}; "
                      "mode is 'eval' or 'train'", DeprecationWarning, stacklevel=3)
        return mode, None
    perturbation = perturbation or "random"
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation: got {perturbation!r}, allowed: {', '.join(map(repr, PERTURBATIONS))}")
    return perturbation, mode


@torch.no_grad()
def output_change(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor | None = None, eps: float | None = None,
                  mode: str | None = None, n_samples: int = 1, seed: int = 0, tgt_out: torch.Tensor | None = None,
                  stacks: tuple[str, ...] | None = None, *, perturbation: str | None = None,
                  preset: str | Definition | None = None, norm: str | None = None, read: str | None = None,
                  padding: str | None = None, masks: str | None = None) -> dict[str, float]:
    """``{stack: Delta F}`` for the stacks of the definition the model has, each averaged over ``n_samples``
    perturbations.

    Args:
        model: an unwrapped ``Seq2SeqTransformer`` or ``CausalLM``; parameters and buffers stay bit-identical
            (BatchNorm's running statistics too, even in train mode), train/eval flags restored.
        src, tgt_in: int64 (B, S), (B, T). ``tgt_in=None``: ``src`` is the ids of a decoder-only model (its one
            stack, "decoder", every position real). ``tgt_out`` (for ``grad_sign``) defaults to the decoder's input
            shifted left (next-token targets).
        eps: step size per weight; default the reference's: 1e-4 for "random", 1e-6 for "grad_sign".
        perturbation: "random" (fresh signs per sample, seeded by ``seed``) or "grad_sign" (one sample).
        preset, norm, read, mode, padding, masks, stacks: the ``Definition`` (module docstring); a preset ("ours",
            "reference") with any of the others overriding it. ``mode="random"|"grad_sign"`` is read as the
            perturbation, as before it was renamed.
    """
    perturbation, mode = _resolve_perturbation(mode, perturbation)
    d = definition(preset, norm=norm, read=read, mode=mode, padding=padding, masks=masks, stacks=stacks)
    if eps is None:
        eps = DEFAULT_EPS[perturbation]
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps: got {eps!r}, must be a finite number >= 0")
    if n_samples < 1:
        raise ValueError(f"n_samples: got {n_samples}, must be >= 1")
    keep = pad_masks(model, src, tgt_in)
    inputs = model_inputs(src, tgt_in)
    last = {s: subs[-1][1] for s, subs in sublayers(model).items()}
    measured = tuple(s for s in d.stacks if s in last)
    if not measured:
        raise ValueError(f"stacks: the definition measures {', '.join(d.stacks)}, but the model has only "
                         f"{', '.join(last)}; pass stacks={tuple(last)!r}")
    if tgt_out is None:
        tgt_out = default_tgt_out(inputs[-1], model.cfg.pad_id)
    wrapper = _Stacks(model, measured if len(inputs) == 1 or "decoder" in measured else ("encoder",))
    names = perturbed_names(model)
    generator = torch.Generator().manual_seed(seed)
    totals = {s: 0.0 for s in measured}
    samples = 1 if perturbation == "grad_sign" else n_samples
    read_out: dict[str, torch.Tensor] = {}

    def capture(stack: str):
        def hook(module, inputs, output) -> None:
            read_out[stack] = torch.cat(stream_tensors(output), dim=-1)
        return hook

    def forward(params: dict | None) -> dict[str, torch.Tensor]:
        if d.masks == "shared":
            torch.manual_seed(seed)
        out = wrapper(*inputs) if params is None else \
            functional_call(wrapper, params, inputs, tie_weights=True, strict=False)
        return {s: read_out[s] if d.read == "before_final_norm" else out[s] for s in measured}

    buffers = {n: b.clone() for n, b in model.named_buffers()}  # train mode may update BatchNorm's statistics
    devices = [src.device] if src.device.type == "cuda" else []
    try:
        with registered_hooks() as hooks, train_mode(model, d.mode == "train"), \
                torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)  # dropout masks: one seeded stream, fresh masks for every forward
            if d.read == "before_final_norm":
                for s in measured:
                    hooks.forward(last[s], capture(s))
            base = forward(None)
            for _ in range(samples):
                moved = _moved(model, names, perturbation, eps, generator, src, tgt_in, tgt_out)
                new = forward(moved)
                del moved
                for s in measured:
                    diff = (new[s] - base[s]).double()
                    diff = diff[keep[s]] if d.padding == "skip" else diff  # (n_tokens, D) or (B, T, D)
                    sq = diff.pow(2).sum().item()
                    totals[s] += sq if d.norm == "squared" else math.sqrt(sq)
    finally:
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return {s: v / samples for s, v in totals.items()}
