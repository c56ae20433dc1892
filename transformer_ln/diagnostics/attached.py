"""The paper's analyses on the sites ``attach`` finds: residual dependency, output change, gradient norms.

They read x, a, s and the sub-layer outputs through hooks (``Sites``), so they run on any model ``attach`` knows
or a declaration describes; on our own models they give exactly what ``residual_dependency``, ``output_change``
and ``gradient_norms`` give. Every function takes ``sites`` (from ``attach``; a model is attached on the spot) and
the batch ``inputs`` (a dict of keyword arguments, a tuple of positional ones, or one tensor).

* Dependency: as ``dependency``'s module docstring. At each site the components of the stream are scaled by the
  combiner's ``scales()`` (ours only), a's is appended, and at a post-norm all go through the norm's linear part:
  our norms' ``decompose``; ``nn.LayerNorm`` (BERT's, BART's), ``nn.RMSNorm`` and RMS norms by class name
  (LLaMA's ``LlamaRMSNorm``, Mistral's, Qwen2's, ``T5LayerNorm``): g (c - mean c) / sigma(s), g c / rms(s), with
  the norm's eps. At every site x + a must equal s (relative 1e-8 in float64, 1e-4 in float32): else a
  ``SitesError``, since the sites do not match the model's code.
* Output change: F per stack is the stack output (after the final norm; ``read="before_final_norm"``: the last
  block's output), the final hidden states, not the logits; the ``Definition``s and perturbations of
  ``output_change`` (W* = W + eps sign(noise) or W - eps sign(dL/dW); biases, norms' parameters and our
  combiners' scales stay; a norm is a module whose class name has "Norm", or one of ours).
* Gradient norms: |dL/d out_i| at each sub-layer output and |dL/dp| over its parameters (``Site.modules``); L is
  ``loss_fn(output, inputs)``, by default the family's (our next-token cross-entropy; a Hugging Face model's own
  loss when the batch has labels, else next-token cross-entropy on the (decoder) input ids).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from ..model.norms import is_norm
from ..model.sublayer import Residual
from .dependency import beta_from_stds
from .families import attach
from .grad_norms import NORM_KEYS
from .hooks import mode as train_mode
from .hooks import registered_hooks
from .output_change import DEFAULT_EPS, PERTURBATIONS, definition
from .sites import Site, Sites, SitesError

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4}


def as_sites(sites) -> Sites:
    return sites if isinstance(sites, Sites) else attach(sites)


def decompose(norm: nn.Module, parts: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The norm's linear part applied to components summing to its input ``x`` (per token over the last dim)."""
    if hasattr(norm, "decompose"):
        return norm.decompose(parts, x)
    x = x.to(parts[0].dtype)
    weight = getattr(norm, "weight", None)
    g = 1.0 if weight is None else weight.detach().to(x.dtype)
    name = type(norm).__name__
    if isinstance(norm, nn.LayerNorm):
        if len(norm.normalized_shape) != 1:
            raise SitesError(f"{name} over {tuple(norm.normalized_shape)}: only a norm over the last dim decomposes")
        sigma = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + norm.eps)
        return [g * (c - c.mean(dim=-1, keepdim=True)) / sigma for c in parts]
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    rms_like = isinstance(norm, nn.RMSNorm) or (name.endswith("RMSNorm") and "Gemma" not in name) \
        or name == "T5LayerNorm"
    if rms_like:
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
        return [g * c / rms for c in parts]
    raise SitesError(f"post-norm {name}: no linear decomposition known (LayerNorm, RMSNorm and ours are); "
                     "give it a decompose(parts, x) method")


def _scaled(value, like: torch.Tensor):
    if value is None:
        return None
    return value.detach().to(like.dtype) if isinstance(value, torch.Tensor) else float(value)


class _Tracker:
    """The components of one stack's stream, updated as the taps fire (x, a before s at every site)."""

    def __init__(self, sites: Sites, stack: str, keep: torch.Tensor | None, n: int, keep_components: bool, check):
        self.sites, self.stack, self.keep, self.check = sites, stack, keep, check
        self.comps: list[torch.Tensor] = []
        self.seen: dict[int, dict] = {}
        self.s = np.zeros((n, n + 1))
        self.rows: list[torch.Tensor] | None = [] if keep_components else None

    def value(self, site: Site, key: str, v) -> None:
        self.seen.setdefault(id(site), {})[key] = self.sites.layout(self.stack, v).double()

    def on_sum(self, site: Site, s: torch.Tensor) -> None:
        got = self.seen.pop(id(site), {})
        if "x" not in got or "a" not in got:
            raise SitesError(f"site {site.name}: its sum was reached before its shortcut or branch ran; the "
                             "declaration's order or paths do not match the model's forward")
        x, a, s = got["x"], got["a"], self.sites.layout(self.stack, s)
        sx, sb = site.scales() if site.scales is not None else (None, None)
        sx, sb = _scaled(sx, x), _scaled(sb, x)
        expected = (x if sx is None else x * sx) + (a if sb is None else a * sb)
        if self.check is not None:
            self.check(site, expected, s)
        if not self.comps:
            self.comps.append(x)
        if sx is not None:
            self.comps = [c * sx for c in self.comps]
        self.comps.append(a if sb is None else a * sb)
        if site.post_norm is not None:
            self.comps = decompose(site.post_norm, self.comps, s.double())
        row = site.index - 1
        for j, c in enumerate(self.comps):
            std = c.std(dim=-1, unbiased=False)
            self.s[row, j] = (std if self.keep is None else std[self.keep]).mean().item()
        if self.rows is not None:
            self.rows.append(torch.stack(self.comps))


def sum_check(site: Site, expected: torch.Tensor, s: torch.Tensor, tol: float | None = None) -> float:
    """Relative max difference between x + a (scaled) and s; a ``SitesError`` above ``tol`` (dtype default)."""
    err = ((expected - s.to(expected.dtype)).abs().max() / s.abs().max().clamp_min(1e-30)).item()
    tol = TOLERANCE.get(s.dtype, 1e-2) if tol is None else tol
    if not err <= tol:
        raise SitesError(f"site {site.name}: shortcut + branch differs from the sum by {err:.1e} (relative); the "
                         "sites do not match the model's code (or dropout is on in the branch)")
    return err


@torch.no_grad()
def _track(sites: Sites, inputs, keep=None, keep_components: bool = False, check=sum_check) -> dict[str, _Tracker]:
    masks = sites.keep(inputs, keep)
    trackers = {st: _Tracker(sites, st, masks[st], len(subs), keep_components, check)
                for st, subs in sites.stacks().items()}
    with registered_hooks() as hooks, train_mode(sites.model, False):
        for site in sites:
            tr = trackers[site.stack]
            site.x.register(hooks, lambda v, site=site, tr=tr: tr.value(site, "x", v))
            site.a.register(hooks, lambda v, site=site, tr=tr: tr.value(site, "a", v))
            site.s.register(hooks, lambda v, site=site, tr=tr: tr.on_sum(site, v))
        sites.run(inputs)
    return trackers


def site_stds(sites, inputs, keep=None) -> dict[str, np.ndarray]:
    """s_{i,j} per stack, (n_sub, n_sub + 1): row i-1 the sub-layer output x_i, column j the component a_j."""
    return {st: tr.s for st, tr in _track(as_sites(sites), inputs, keep).items()}


def site_dependency(sites, inputs, keep=None) -> dict[str, np.ndarray]:
    """beta per stack, ``{stack: (n_sub, n_sub + 1)}`` numpy arrays, rows of unit L2 norm (``residual_dependency``'s
    layout: column 0 the stack input x_0, column j the branch a_j). ``keep``: bool (B, T) real tokens (a tensor for
    every stack or ``{stack: mask}``), by default read from the batch's attention masks (ours: pad ids)."""
    return {st: beta_from_stds(s) for st, s in site_stds(sites, inputs, keep).items()}


def site_components(sites, inputs, keep=None) -> dict[str, list[torch.Tensor]]:
    """Per stack, per sub-layer i a float64 (i + 1, B, T, D) tensor: row j the component of a_j in x_i. They sum to
    x_i for Pre-LN, to x_i less the post-norms' propagated shifts (LayerNorm's bias) for Post-LN."""
    return {st: tr.rows for st, tr in _track(as_sites(sites), inputs, keep, keep_components=True).items()}


@torch.no_grad()
def site_values(sites, inputs) -> list[dict[str, Any]]:
    """For checks on small models: per site ``{"name", "stack", "x", "a", "s", "out"}``, float64 (B, T, D)
    tensors as the hooks saw them (``out``: a list for our ResiDual's two streams)."""
    sites = as_sites(sites)
    seen: dict[int, dict] = {id(site): {"name": site.name, "stack": site.stack} for site in sites}

    def put(site: Site, key: str):
        def fn(v):
            fix = (lambda t: sites.layout(site.stack, t).double())
            seen[id(site)][key] = [fix(t) for t in v] if isinstance(v, list) else fix(v)
        return fn

    with registered_hooks() as hooks, train_mode(sites.model, False):
        for site in sites:
            for key in ("x", "a", "s", "out"):
                getattr(site, key).register(hooks, put(site, key))
        sites.run(inputs)
    return [seen[id(site)] for site in sites]


def verify_sites(sites, inputs, tol: float | None = None) -> dict[str, float]:
    """``{site name: relative |x + a - s|}`` on one eval forward; a ``SitesError`` where one exceeds ``tol``
    (default 1e-8 in float64, 1e-4 in float32). Run it once after writing a declaration."""
    errors: dict[str, float] = {}

    def check(site, expected, s):
        errors[site.name] = sum_check(site, expected, s, tol)

    _track(as_sites(sites), inputs, check=check)
    return errors


def perturbable(model: nn.Module) -> list[str]:
    """Parameter names that move under output change: not biases, norms' parameters or our combiners' scales."""
    skip = {id(p) for m in model.modules() for pname, p in m.named_parameters(recurse=False)
            if pname == "bias" or is_norm(m) or "Norm" in type(m).__name__ or isinstance(m, Residual)}
    return [n for n, p in model.named_parameters() if id(p) not in skip]


def _loss(sites: Sites, loss_fn):
    fn = loss_fn or sites.loss_fn
    if fn is None:
        raise SitesError(f"{sites.family} sites have no default loss; pass loss_fn=(output, inputs) -> scalar")
    return fn


@torch.no_grad()
def site_output_change(sites, inputs, eps: float | None = None, *, perturbation: str = "random", n_samples: int = 1,
                       seed: int = 0, loss_fn=None, keep=None, preset=None, norm=None, read=None, mode=None,
                       padding=None, masks=None, stacks=None) -> dict[str, float]:
    """``{stack: Delta F}`` as ``output_change`` (same ``Definition`` options and defaults), F the stack output
    read by hooks; parameters, buffers and train/eval flags are left as they were."""
    sites = as_sites(sites)
    model = sites.model
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation: got {perturbation!r}, allowed: {', '.join(map(repr, PERTURBATIONS))}")
    d = definition(preset, norm=norm, read=read, mode=mode, padding=padding, masks=masks, stacks=stacks)
    eps = DEFAULT_EPS[perturbation] if eps is None else eps
    if not math.isfinite(eps) or eps < 0 or n_samples < 1:
        raise ValueError(f"eps: got {eps!r} (finite, >= 0), n_samples: got {n_samples} (>= 1)")
    have = sites.stacks()
    measured = tuple(s for s in d.stacks if s in have)
    if not measured:
        raise ValueError(f"stacks: the definition measures {', '.join(d.stacks)}, but the model has only "
                         f"{', '.join(have)}; pass stacks={tuple(have)!r}")
    keep_masks = sites.keep(inputs, keep)
    taps = sites.outputs if d.read == "stack_output" else sites.before_final
    names = perturbable(model)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    read_out: dict[str, torch.Tensor] = {}

    def forward(moved: dict | None) -> dict[str, torch.Tensor]:
        if d.masks == "shared":
            torch.manual_seed(seed)
        sites.run(inputs, moved)
        return {s: sites.layout(s, read_out[s]) for s in measured}

    def moved() -> dict[str, torch.Tensor]:
        if perturbation == "random":
            signs = (torch.randn(params[n].shape, generator=generator).sign_() for n in names)
        else:
            with torch.enable_grad():
                loss = _loss(sites, loss_fn)(sites.run(inputs), inputs)
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            signs = (torch.zeros_like(params[n]) if g is None else -torch.sign(g) for n, g in zip(names, grads))
        return {n: params[n].detach().clone().add_(s.to(params[n].device, params[n].dtype), alpha=eps)
                for n, s in zip(names, signs)}

    totals = {s: 0.0 for s in measured}
    samples = 1 if perturbation == "grad_sign" else n_samples
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    devices = [p.device for p in params.values() if p.device.type == "cuda"][:1]
    try:
        with registered_hooks() as hooks, train_mode(model, d.mode == "train"), torch.random.fork_rng(devices):
            torch.manual_seed(seed)
            for s in measured:
                taps[s].register(hooks, lambda v, s=s: read_out.__setitem__(s, v))
            base = forward(None)
            for _ in range(samples):
                new = forward(moved())
                for s in measured:
                    diff = (new[s] - base[s]).double()
                    diff = diff[keep_masks[s]] if d.padding == "skip" and keep_masks[s] is not None else diff
                    sq = diff.pow(2).sum().item()
                    totals[s] += sq if d.norm == "squared" else math.sqrt(sq)
    finally:
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return {s: v / samples for s, v in totals.items()}


def site_gradient_norms(sites, inputs, loss_fn=None, training: bool = False) -> dict[str, dict[str, Any]]:
    """``{site name: {"stack", "index", "kind", "output_grad_norm", "param_grad_norm", "output_grad_rel",
    "param_grad_rel"}}`` in forward order, as ``gradient_norms`` (``.grad`` fields untouched)."""
    sites = as_sites(sites)
    outputs: dict[int, list[torch.Tensor]] = {}

    def capture(site: Site):
        return lambda v: outputs.__setitem__(id(site), v if isinstance(v, list) else [v])

    with registered_hooks() as hooks, train_mode(sites.model, training), torch.enable_grad():
        for site in sites:
            site.out.register(hooks, capture(site))
        loss = _loss(sites, loss_fn)(sites.run(inputs), inputs)
        groups = []
        for site in sites:
            own = {id(p): p for m in site.modules for p in m.parameters() if p.requires_grad}
            groups.append(list(own.values()))
        streams = [t for site in sites for t in outputs[id(site)]]
        grads = list(torch.autograd.grad(loss, streams + [p for g in groups for p in g], allow_unused=True))
    out_grads, param_grads = grads[:len(streams)], grads[len(streams):]
    norm = (lambda gs: math.sqrt(sum(g.double().pow(2).sum().item() for g in gs if g is not None)))
    result: dict[str, dict[str, Any]] = {}
    for site, group in zip(sites, groups):
        g_out = [out_grads.pop(0) for _ in outputs[id(site)]]
        g_par = [param_grads.pop(0) for _ in group]
        result[site.name] = {"stack": site.stack, "index": site.index, "kind": site.kind,
                             "output_grad_norm": norm(g_out), "param_grad_norm": norm(g_par)}
    for key in NORM_KEYS:
        top = max((r[key] for r in result.values()), default=0.0)
        for r in result.values():
            r[key.replace("_norm", "_rel")] = r[key] / top if top > 0 else 0.0
    return result
