"""The residual sites of any Transformer: where each sub-layer's shortcut, branch and norms are, read by hooks.

A residual sub-layer adds a branch term a to its shortcut input x; the sum s = x + a (scaled by Admin's omega or
DeepNorm's alpha where our own ``Residual`` says so) goes through a post-norm (Post-LN) or on as the stream
(Pre-LN). ``attach(model)`` finds every such site, in forward order, and says where hooks read x, a, s and the
sub-layer's output without the model's code being touched::

    sites = attach(model)                       # Hugging Face, torch.nn.Transformer*Layer, transformer_ln models
    sites = attach(model, Declaration(blocks="layers", sublayers=[("attn", "norm1", None), ("mlp", "norm2", None)]))

Each ``Site`` holds ``Tap``s: a module and whether its input (argument ``arg`` or keyword ``kw``) or its output
(first element of a tuple) is the value. For a declared or recognised block the taps follow from where the norms
are (``_taps``): x is the pre-norm's input, else the previous sub-layer's post-norm output, else the block input;
s is the post-norm's input, else the next sub-layer's pre-norm input, else the block output. ``verify`` checks on
a batch that x + a = s at every site, so a wrong declaration is an error, never a wrong number.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from ..errors import UserError
from .hooks import STACKS

KINDS = ("self_attn", "cross_attn", "ffn")
EXAMPLE = ("attach(model, {'blocks': 'layers', 'sublayers': [('attn', 'norm1', None), ('mlp', 'norm2', None)]}) "
           "with your block list's path and, per sub-layer, (branch, pre_norm, post_norm) paths inside a block")


class SitesError(UserError, ValueError):
    """A model whose residual sites are not known (or a declaration that does not match it): one line to fix."""


def first(value):
    """The tensor of a value that may be a tuple (a block returning (hidden, cache, ...))."""
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


@dataclass(eq=False)
class Tap:
    """Where a hook reads a value: ``module``'s input (positional ``arg`` or keyword ``kw``) or its output.

    ``streams``: a tuple output is returned as a list of its tensors (our ResiDual's (p, d)); ``cat``: concatenated
    on the last dimension. Otherwise the first tensor of a tuple.
    """

    module: nn.Module
    where: str = "out"
    arg: int = 0
    kw: str | None = None
    streams: bool = False
    cat: bool = False

    def pick(self, value):
        if isinstance(value, (tuple, list)) and (self.streams or self.cat):
            parts = [first(v) for v in value]
            return torch.cat(parts, dim=-1) if self.cat else parts
        return [first(value)] if self.streams else first(value)

    def raw(self, args: tuple, kwargs: dict):
        if len(args) > self.arg:
            return args[self.arg]
        if self.kw is not None and self.kw in kwargs:
            return kwargs[self.kw]
        raise SitesError(f"{type(self.module).__name__} was called without argument {self.arg} "
                         f"({self.kw or 'positional'}); the site's tap does not match this model's code")

    def register(self, hooks, fn: Callable[[Any], None]) -> None:
        """Call ``fn(value)`` each time the module runs (handles go to a ``registered_hooks()`` set); the hooks
        return None, so the model's values are never replaced."""
        if self.where == "in":
            def pre(module, args, kwargs) -> None:
                fn(self.pick(self.raw(args, kwargs)))
            hooks.handles.append(self.module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, output) -> None:
                fn(self.pick(output))
            hooks.handles.append(self.module.register_forward_hook(post))


@dataclass(eq=False)
class SumTap:
    """The sum of two taps' values, reported when the second fires (our ResiDual decoder-only output p + LN(d))."""

    left: Tap
    right: Tap

    def register(self, hooks, fn) -> None:
        seen: list = []
        self.left.register(hooks, lambda v: seen.append(v))
        self.right.register(hooks, lambda v: fn(seen.pop() + v))


@dataclass(eq=False)
class QK:
    """How to read one attention's queries and keys: ``q``/``k`` taps give (B, T, H*Dh) projections (``packed``:
    one tap giving [q; k; v]; ``k_cols``: only the k tap's first columns are k, as our [k; v]); ``scale``
    multiplies q.k; ``heads``: the taps give (B, H, T, Dh) (read after per-head QK-norms); ``rope``: "hf" (the attention's ``position_embeddings`` keyword, LLaMA's rotate-half) or
    "ours" (its ``rope`` keyword); ``causal``: keys after the query are masked; ``mha``: an
    ``nn.MultiheadAttention``, q and k from its inputs and in-projection, its masks from its keywords."""

    attention: nn.Module
    head_dim: int
    scale: float
    q: Tap | None = None
    k: Tap | None = None
    packed: Tap | None = None
    rope: str | None = None
    causal: bool = False
    mha: bool = False
    k_cols: int | None = None  # nn.MultiheadAttention: q, k from its inputs and in_proj
    heads: bool = False  # the q and k taps give (B, H, T, Dh), already split into heads (after per-head norms)


@dataclass(eq=False)
class Site:
    """One residual sub-layer. ``index``: the paper's 1-based i within ``stack``; ``layer``: 0-based block index.

    ``x``, ``a``, ``s`` read the shortcut input, the branch term and their sum; ``out`` the sub-layer output (the
    post-norm's output, else s). ``modules`` own the sub-layer's parameters; ``scales()`` -> (shortcut, branch)
    multipliers (None = 1) where the combiner has them; ``qk`` reads an attention's queries and keys.
    """

    name: str
    stack: str
    kind: str
    layer: int
    index: int
    block: nn.Module
    block_name: str
    branch: nn.Module
    pre_norm: nn.Module | None
    post_norm: nn.Module | None
    x: Tap
    a: Tap
    s: Tap
    out: Tap | None = None
    modules: tuple = ()
    scales: Callable | None = None
    qk: QK | None = None

    def __post_init__(self):
        if self.out is None:
            self.out = Tap(self.post_norm) if self.post_norm is not None else self.s

    def describe(self) -> dict:
        norm = (lambda m: None if m is None else type(m).__name__)
        return {"name": self.name, "stack": self.stack, "kind": self.kind, "layer": self.layer, "index": self.index,
                "branch": type(self.branch).__name__, "pre_norm": norm(self.pre_norm),
                "post_norm": norm(self.post_norm)}


def block_in(block: nn.Module) -> Tap:
    """The block's first forward argument (its stream input), positional or by keyword."""
    try:
        name = next(iter(inspect.signature(block.forward).parameters))
    except (StopIteration, TypeError, ValueError):
        name = None
    return Tap(block, "in", 0, name)


@dataclass(eq=False)
class Sites:
    """The sites of one model, in forward order, and what the analyses need to run it.

    ``outputs[stack]``: the stack output (after its final norm, if any); ``before_final[stack]``: the last block's
    output. ``keep_fn(inputs)`` -> {stack: bool (B, T) mask of real tokens}; ``loss_fn(output, inputs)`` the
    default loss; ``call_kwargs``: added to a dict batch (``use_cache=False``); ``seq_first``: stacks whose tensors
    are (T, B, D) (torch.nn layers without ``batch_first``); analyses see them as (B, T, D).
    """

    model: nn.Module
    family: str
    sites: list[Site]
    outputs: dict[str, Any] = field(default_factory=dict)
    before_final: dict[str, Any] = field(default_factory=dict)
    keep_fn: Callable | None = None
    loss_fn: Callable | None = None
    call_kwargs: dict = field(default_factory=dict)
    seq_first: frozenset = frozenset()

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def __len__(self) -> int:
        return len(self.sites)

    def stacks(self) -> dict[str, list[Site]]:
        """``{stack: [Site, ...]}`` in ``STACKS`` order, only the stacks the model has."""
        out = {s: [site for site in self.sites if site.stack == s] for s in STACKS}
        return {s: v for s, v in out.items() if v}

    def blocks(self) -> dict[str, list[tuple[str, nn.Module]]]:
        """``{stack: [(block name, block), ...]}``: the layers, in forward order."""
        out: dict[str, list] = {}
        for site in self.sites:
            names = out.setdefault(site.stack, [])
            if not names or names[-1][1] is not site.block:
                names.append((site.block_name, site.block))
        return out

    def describe(self) -> list[dict]:
        return [site.describe() for site in self.sites]

    def layout(self, stack: str, t: torch.Tensor) -> torch.Tensor:
        """(B, T, D) view of a stack's tensor."""
        return t.transpose(0, 1) if stack in self.seq_first else t

    def keep(self, inputs, keep=None) -> dict[str, torch.Tensor | None]:
        """Per stack a bool (B, T) mask of real tokens: ``keep`` (one tensor for every stack, or a dict), else the
        family's reading of the batch (attention masks), else None (every position real)."""
        if isinstance(keep, torch.Tensor):
            return {s: keep.bool() for s in self.stacks()}
        found = dict(self.keep_fn(inputs)) if self.keep_fn is not None else {}
        found.update(keep or {})
        return {s: (None if found.get(s) is None else found[s].bool()) for s in self.stacks()}

    def run(self, inputs, params: dict | None = None):
        """The model on a batch: ``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple, else
        ``model(inputs)``; with ``params`` through ``functional_call`` (tied weights kept tied). The fast paths of
        torch.nn's attention and encoder layers are off meanwhile, so hooks see every submodule run."""
        if isinstance(inputs, dict):
            args, kwargs = (), {**self.call_kwargs, **inputs}
        else:
            args, kwargs = (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), {}
        with no_fastpath():
            if params is None:
                return self.model(*args, **kwargs)
            return torch.func.functional_call(self.model, params, args, kwargs, tie_weights=True, strict=False)


@contextmanager
def no_fastpath() -> Iterator[None]:
    """torch.nn's MultiheadAttention/TransformerEncoderLayer fast path (eval, no grad) bypasses the submodules
    hooks are on; switch it off for the block and restore the setting."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@dataclass
class Declaration:
    """The residual sites of a model no recogniser knows, declared by paths (``model.get_submodule``).

    ``blocks``: the path of the layers' ModuleList (``"layers"``), or a list of block paths. ``sublayers``: per
    block, in forward order, ``(branch, pre_norm, post_norm)`` paths inside the block (None: no such norm), an
    optional fourth item the kind (self_attn, cross_attn, ffn; else read from the branch's name). The branch is
    the module whose output (first element of a tuple) is the term added to the shortcut. ``final_norm``: the
    stack's final norm, if any; ``stack``: "encoder" or "decoder". A dict with these keys works too; a list of
    declarations declares several stacks (encoder first).
    """

    blocks: str | Sequence[str]
    sublayers: Sequence[Sequence]
    final_norm: str | None = None
    stack: str = "decoder"


def _get(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SitesError(f"{what} {path!r}: no such submodule in {type(model).__name__}") from None


def kind_of(name: str) -> str:
    low = name.lower()
    if "cross" in low or "encoder_attn" in low or "encdec" in low:
        return "cross_attn"
    return "self_attn" if "attn" in low or "attention" in low else "ffn"


def taps(block: nn.Module, specs: list[dict]) -> list[dict]:
    """x, a, s for each sub-layer spec ``{branch, pre_norm, post_norm}`` of one block (module docstring rules)."""
    out = []
    for k, spec in enumerate(specs):
        pre, post = spec["pre_norm"], spec["post_norm"]
        if pre is not None:
            x = Tap(pre, "in")
        elif k > 0 and specs[k - 1]["post_norm"] is not None:
            x = Tap(specs[k - 1]["post_norm"])
        elif k == 0:
            x = block_in(block)
        else:
            x = Tap(spec["branch"], "in")
        if post is not None:
            s = Tap(post, "in")
        elif k + 1 < len(specs) and specs[k + 1]["pre_norm"] is not None:
            s = Tap(specs[k + 1]["pre_norm"], "in")
        elif k + 1 == len(specs):
            s = Tap(block)
        else:
            s = Tap(specs[k + 1]["branch"], "in")
        out.append({**spec, "x": spec.get("x") or x, "a": spec.get("a") or Tap(spec["branch"]),
                    "s": spec.get("s") or s})
    return out


def build(model: nn.Module, family: str, stacks: list[tuple[str, list[tuple[str, nn.Module, list[dict]]]]],
          final_norms: dict[str, nn.Module | None], **options) -> Sites:
    """``Sites`` from ``[(stack, [(block name, block, [spec per sub-layer]), ...]), ...]``; a spec holds
    ``branch``, ``pre_norm``, ``post_norm``, ``kind`` and optionally ``modules``, ``qk``, explicit taps."""
    sites: list[Site] = []
    outputs, before = {}, {}
    for stack, blocks in stacks:
        if stack not in STACKS:
            raise SitesError(f"stack: got {stack!r}, allowed: {', '.join(STACKS)}")
        index = 0
        for layer, (bname, block, specs) in enumerate(blocks):
            for spec in taps(block, specs):
                index += 1
                own = spec.get("modules") or tuple(m for m in (spec["pre_norm"], spec["branch"], spec["post_norm"])
                                                   if m is not None)
                sites.append(Site(f"{bname}.{spec['kind']}" if "name" not in spec else spec["name"], stack,
                                  spec["kind"], layer, index, block, bname, spec["branch"], spec["pre_norm"],
                                  spec["post_norm"], spec["x"], spec["a"], spec["s"], spec.get("out"), own,
                                  spec.get("scales"), spec.get("qk")))
        last = blocks[-1][1]
        before[stack] = Tap(last)
        norm = final_norms.get(stack)
        outputs[stack] = Tap(norm) if norm is not None else Tap(last)
    return Sites(model, family, sites, outputs, before, **options)


def declared(model: nn.Module, declaration) -> Sites:
    """``Sites`` from a ``Declaration``, a dict of its fields, or a list of them (several stacks)."""
    decls = declaration if isinstance(declaration, (list, tuple)) else [declaration]
    stacks, finals = [], {}
    for d in decls:
        if isinstance(d, dict):
            try:
                d = Declaration(**d)
            except TypeError as e:
                raise SitesError(f"declaration: {e}; fields: blocks, sublayers, final_norm, stack") from None
        if isinstance(d.blocks, str):
            container = _get(model, d.blocks, "blocks")
            paths = [f"{d.blocks}.{n}" if d.blocks else n for n, _ in container.named_children()]
        else:
            paths = list(d.blocks)
        if not paths or not d.sublayers:
            raise SitesError(f"declaration: no blocks or no sublayers declared; e.g. {EXAMPLE}")
        blocks = []
        for path in paths:
            block = _get(model, path, "block")
            specs = []
            for item in d.sublayers:
                if len(item) not in (3, 4):
                    raise SitesError(f"sublayer {item!r}: give (branch, pre_norm, post_norm[, kind]) paths")
                branch, pre, post = (None if p is None else _get(block, p, f"{path}: sub-layer path")
                                     for p in item[:3])
                kind = item[3] if len(item) == 4 else kind_of(item[0])
                if kind not in KINDS:
                    raise SitesError(f"sublayer kind: got {kind!r}, allowed: {', '.join(KINDS)}")
                qk = mha_qk(branch, kind == "self_attn" and d.stack == "decoder")
                specs.append({"branch": branch, "pre_norm": pre, "post_norm": post, "kind": kind, "qk": qk,
                              "name": f"{path}.{item[0]}"})
            blocks.append((path, block, specs))
        stacks.append((d.stack, blocks))
        finals[d.stack] = None if d.final_norm is None else _get(model, d.final_norm, "final_norm")
    return build(model, "declared", stacks, finals)


def mha_qk(branch: nn.Module, causal: bool) -> QK | None:
    """The queries and keys of an ``nn.MultiheadAttention`` branch (from its inputs), else None."""
    if not isinstance(branch, nn.MultiheadAttention):
        return None
    return QK(branch, branch.head_dim, branch.head_dim ** -0.5, causal=causal, mha=True)
