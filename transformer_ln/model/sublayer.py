"""The residual sub-layer and the interface every scheme of ``transformer_ln.model.schemes`` implements.

A sub-layer is a branch f between optional slots (the decomposition of x-transformers and torchtune)::

    h = pre_norm(x)      a = m * Dropout(branch_norm(f(h)))      x' = post_norm(residual(x, a))

(m = ``branch_scale``, 1 unless the branches are depth-scaled).

with ``residual(x, a) = s * x + b * a``; ``Residual.scales()`` exposes (s, b), and an empty slot is ``nn.Identity``.
A branch may hold a norm of its own (``inner_norm``, Sub-LN's). A ``ResidualScheme`` fills the slots at build time,
told the sub-layer's ``Site``; ``Sublayer.forward`` is the same for every scheme, and nothing branches on a name.

Analysis attaches forward hooks: on ``residual`` (positional inputs exactly the shortcut x and the branch output a,
output the sum before ``post_norm``), on the norms (each has ``decompose``), and on the ``Sublayer`` itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .depth_scaling import BRANCH_SCALES, branch_multiplier, optimizer_scales
from .layers import Dropout
from .norms import DEFAULT_NORM, NORMS, apply_norm, make_norm

STACKS = ("encoder", "decoder")
# settings every scheme takes besides ``norm`` and ``norm_eps`` (``ResidualScheme.__init__``), with their defaults
GENERAL_OPTIONS = {"qk_norm": False, "branch_scale": "none", "branch_base_depth": 1}


@dataclass(frozen=True)
class Site:
    """Where a sub-layer sits: what depth-dependent constants (Admin, DeepNorm, T-Fixup, Sub-LN) are computed from.

    ``index`` is the paper's 1-based sub-layer number within the stack; ``kind`` is ``self_attn``, ``cross_attn`` or
    ``ffn``; ``n_sublayers`` the stack's number of residual sub-layers (2 per encoder layer, 3 per decoder layer).
    """

    stack: str
    kind: str
    layer: int
    index: int
    n_enc_layers: int
    n_dec_layers: int
    d_model: int
    n_sublayers: int


@dataclass(frozen=True)
class SchemeOption:
    """One setting of a scheme, the config key ``model.<name>``: its default, allowed values and one line of help.

    ``allowed`` lists the choices; left empty, any finite value of the default's type is allowed. The config reads
    every registered scheme's options from the registry, so a scheme with an option touches only its own module.
    """

    default: Any
    help: str
    allowed: tuple = ()
    bounds: tuple | None = None  # (low, high), both included, for a number

    def check(self, key: str, value: Any) -> Any:
        """``value`` if allowed (an int where the default is a float becomes a float); else a ValueError naming
        ``key``."""
        if self.allowed:
            if value not in self.allowed:
                raise ValueError(f"{key}: got {value!r}, allowed: {', '.join(map(repr, self.allowed))}")
            return value
        kind = type(self.default)
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 7e-4 (and nan) as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ValueError(f"{key}: got {value!r}, expected a {kind.__name__}")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{key}: got {value!r}; NaN and infinity are not allowed, give a finite number")
        if self.bounds is not None and not self.bounds[0] <= value <= self.bounds[1]:
            raise ValueError(f"{key}: got {value!r}, must lie in [{self.bounds[0]}, {self.bounds[1]}]")
        return value


class Residual(nn.Module):
    """The plain shortcut ``x + f_x``: shortcut and branch scale 1."""

    def scales(self) -> tuple[torch.Tensor | float | None, torch.Tensor | float | None]:
        """``(s, b)`` with ``forward(x, f_x) == s * x + b * f_x``; None stands for 1."""
        return None, None

    def forward(self, x: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        return x + f_x


class ScaledResidual(Residual):
    """``alpha * x + f_x`` with a constant alpha (DeepNorm's up-weighted shortcut)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)

    def scales(self):
        return self.alpha, None

    def forward(self, x: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        return torch.add(f_x, x, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4f}"


class GatedResidual(Residual):
    """``x + alpha * f_x`` with one learnable scalar alpha starting at ``init_value`` (ReZero: 0, the identity)."""

    def __init__(self, init_value: float = 0.0):
        super().__init__()
        self.init_value = float(init_value)
        self.alpha = nn.Parameter(torch.full((1,), self.init_value))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.init_value)

    def scales(self):
        return None, self.alpha

    def forward(self, x: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(x, f_x, self.alpha)

    def extra_repr(self) -> str:
        return f"init_value={self.init_value}"


class Sublayer(nn.Module):
    """One residual sub-layer: ``post_norm(residual(x, dropout(branch_norm(branch(pre_norm(x), *ctx)))))``.

    ``keep`` (bool (B, T), True at real tokens) reaches the norms and the branch only when given: BatchNorm needs it
    for its statistics; every other norm ignores padding by construction.
    """

    def __init__(self, branch: nn.Module, residual: nn.Module, pre_norm: nn.Module | None = None,
                 branch_norm: nn.Module | None = None, post_norm: nn.Module | None = None, dropout: float = 0.0,
                 scheme: "ResidualScheme | None" = None, site: Site | None = None):
        super().__init__()
        self.pre_norm = nn.Identity() if pre_norm is None else pre_norm
        self.branch = branch
        self.branch_norm = nn.Identity() if branch_norm is None else branch_norm
        self.dropout = Dropout(dropout)
        self.residual = residual
        self.post_norm = nn.Identity() if post_norm is None else post_norm
        self.scheme, self.site = scheme, site  # plain attributes: the init hook and analysis read them
        self.branch_scale = 1.0  # a constant multiplier on the branch (depth-muP, CompleteP): set by the scheme

    def _branch(self, x: torch.Tensor, ctx: tuple, kwargs: dict, keep: torch.Tensor | None) -> torch.Tensor:
        if keep is None:
            a = self.dropout(self.branch_norm(self.branch(self.pre_norm(x), *ctx, **kwargs)))
        else:
            f = self.branch(apply_norm(self.pre_norm, x, keep), *ctx, keep=keep, **kwargs)
            a = self.dropout(apply_norm(self.branch_norm, f, keep))
        return a if self.branch_scale == 1.0 else a * self.branch_scale

    def forward(self, x: torch.Tensor, *ctx, keep: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        a = self._branch(x, ctx, kwargs, keep)
        return apply_norm(self.post_norm, self.residual(x, a), keep)


class DualSublayer(Sublayer):
    """A sub-layer on two streams (p, d) (ResiDual): ``p' = post_norm(residual(p, a))``, ``d' = d + a``, a = branch(p).

    Input and output are ``(p, d)`` tuples; a plain tensor x is taken as ``(x, x)``. ``residual`` combines the
    Post-LN stream p (what analysis hooks see as the sub-layer's shortcut and branch); ``dual`` accumulates d.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dual = Residual()

    def forward(self, x, *ctx, keep: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        p, d = x if isinstance(x, tuple) else (x, x)
        a = self._branch(p, ctx, kwargs, keep)
        return apply_norm(self.post_norm, self.residual(p, a), keep), self.dual(d, a)


class ResidualScheme:
    """Post-LN's placement by default; subclasses in ``transformer_ln.model.schemes`` change the class attributes below
    and override the hooks they need. An instance is built with its options (``norm`` and those named in
    ``options``, read from ``ModelConfig`` fields of the same names) and builds every sub-layer of a model.
    """

    name = "post_ln"
    label = "Post-LN"
    color = "tab:red"
    pre_norm = False     # norm on the branch input
    branch_norm = False  # norm on the branch output, before the sum (Sandwich / Peri-LN)
    post_norm = True     # norm on the sum
    final_norm = False   # norm at the end of each stack
    has_norms = True     # False: the scheme holds no normalization module at all (``norm`` must stay the default)
    custom_init = False  # True: ``init_sublayer``/``init_model`` change the default initialisation
    sublayer_class = Sublayer
    options: dict[str, SchemeOption] = {}  # the scheme's own settings, config keys model.<name> (Admin: admin_omega)
    # panels the scheme adds to the training-curves figure: (metrics key, title, (band low key, band high key) or
    # None), read from the train records its ``update_stats`` fills
    curve_panels: tuple[tuple[str, str, tuple[str, str] | None], ...] = ()

    def __init__(self, norm: str = DEFAULT_NORM, norm_eps: float | None = None, qk_norm: bool = False,
                 branch_scale: str = "none", branch_base_depth: int = 1, **options):
        """``options``: values of the scheme's declared ``options`` (each checked; the rest at their defaults),
        set as attributes of the same names. ``norm_eps``: the norms' epsilon (None: the norm's default).

        Settings of every scheme (``GENERAL_OPTIONS``): ``qk_norm`` puts ``norm`` per head on the queries and keys of
        every attention (before rotary positions); ``branch_scale`` (``none``, ``depth_mup``, ``completep``) and
        ``branch_base_depth`` multiply each branch by (L / L_base)^(-a) (``transformer_ln.model.depth_scaling``)."""
        if not isinstance(qk_norm, bool):
            raise ValueError(f"qk_norm: got {qk_norm!r}, expected true or false")
        if branch_scale not in BRANCH_SCALES:
            raise ValueError(f"branch_scale: got {branch_scale!r}, allowed: {', '.join(map(repr, BRANCH_SCALES))}")
        if isinstance(branch_base_depth, bool) or not isinstance(branch_base_depth, int) or branch_base_depth < 1:
            raise ValueError(f"branch_base_depth: got {branch_base_depth!r}, must be an integer >= 1")
        self.qk_norm, self.branch_scale, self.branch_base_depth = qk_norm, branch_scale, branch_base_depth
        if norm not in NORMS:
            raise ValueError(f"norm: got {norm!r}, allowed: {', '.join(map(repr, NORMS))}")
        if not self.has_norms and norm != DEFAULT_NORM:
            raise ValueError(f"norm: got {norm!r}, but residual scheme {self.name!r} has no normalization; "
                             f"leave norm at {DEFAULT_NORM!r} (the default, unused by this scheme)")
        self.norm, self.norm_eps = norm, norm_eps
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(f"scheme {self.name!r} has no option {', '.join(unknown)}; its options: "
                             f"{', '.join(self.options) or 'none'}")
        for name, spec in self.options.items():
            setattr(self, name, spec.check(name, options.get(name, spec.default)))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={getattr(self, k)!r}" for k in self.options)
        opts += "".join(f", {k}={getattr(self, k)!r}" for k, v in GENERAL_OPTIONS.items() if getattr(self, k) != v)
        return f"{type(self).__name__}(norm={self.norm!r}{opts})"

    # ---- build time
    def make_norm(self, d_model: int) -> nn.Module:
        return make_norm(self.norm, d_model, self.norm_eps)

    def _slot(self, enabled: bool, d_model: int) -> nn.Module | None:
        return self.make_norm(d_model) if enabled and self.has_norms else None

    def needs_stack_size(self) -> bool:
        """True when a sub-layer's constants come from its stack's size (a standalone layer must be told it)."""
        return False

    def needs_depths(self) -> bool:
        """True when a sub-layer's constants come from the model's layer counts (N encoder, M decoder layers): a
        standalone layer must be given ``depths``. Depth-scaled branches need them whatever the scheme."""
        return self.branch_scale != "none"

    @staticmethod
    def stack_depth(site: Site) -> int:
        """L, the number of layers of the stack the sub-layer at ``site`` belongs to."""
        return site.n_enc_layers if site.stack == "encoder" else site.n_dec_layers

    def optimizer_scales(self, site: Site) -> tuple[float, float]:
        """(learning-rate factor, AdamW-epsilon factor) for the parameters of the sub-layer at ``site``: 1 and 1
        unless the branches are depth-scaled (their rule: ``transformer_ln.model.depth_scaling``)."""
        return optimizer_scales(self.branch_scale, self.stack_depth(site), self.branch_base_depth)

    def residual(self, site: Site) -> nn.Module:
        """The module that combines shortcut and branch at ``site``."""
        return Residual()

    def placement(self, site: Site) -> tuple[bool, bool, bool]:
        """Which norm slots (pre, branch, post) the sub-layer at ``site`` fills: the class attributes, the same at
        every site, unless a scheme places its norms by depth (Mix-LN) or by sub-layer kind (HybridNorm)."""
        return self.pre_norm, self.branch_norm, self.post_norm

    def build_sublayer(self, branch: nn.Module, site: Site, dropout: float = 0.0) -> Sublayer:
        pre, mid, post = self.placement(site)
        if self.qk_norm and hasattr(branch, "add_head_norms"):
            branch.add_head_norms(self.make_norm, ("q", "k"))
        sub = self.sublayer_class(branch, self.residual(site), pre_norm=self._slot(pre, site.d_model),
                                  branch_norm=self._slot(mid, site.d_model),
                                  post_norm=self._slot(post, site.d_model), dropout=dropout,
                                  scheme=self, site=site)
        sub.branch_scale = branch_multiplier(self.branch_scale, self.stack_depth(site), self.branch_base_depth)
        return sub

    def stack_norm(self, d_model: int) -> nn.Module:
        """The norm at the end of each stack (``nn.Identity`` if the scheme has none)."""
        norm = self._slot(self.final_norm, d_model)
        return nn.Identity() if norm is None else norm

    # ---- forward of a stack
    def begin(self, x0: torch.Tensor):
        """The stream entering the first sub-layer, from the stack input x_0."""
        return x0

    def end(self, stream, final_norm: nn.Module, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The stack output from the stream leaving its last sub-layer."""
        return apply_norm(final_norm, stream, keep)

    # ---- initialisation and calibration
    def init_sublayer(self, sub: Sublayer) -> None:
        """Called by ``init_weights`` on every sub-layer after the default initialisation."""

    def init_model(self, model: nn.Module) -> None:
        """Called by ``init_weights`` on a whole model (``Seq2SeqTransformer``, ``CausalLM``) after the sub-layers
        (embeddings)."""

    def calibrate(self, model: nn.Module, *inputs: torch.Tensor, seed: int = 0) -> dict | None:
        """Data-dependent initialisation on one batch before the first update (``model(*inputs)``: src and tgt_in
        for the encoder-decoder, ids for a causal LM); None if the scheme has none. Returns what it measured (the
        trainer keeps it as the run's ``profile.json``)."""
        return None

    def calibration_note(self, profile: dict) -> str:
        """One line for the log about what ``calibrate`` returned."""
        return f"{self.label} calibrated on the first batch"

    # ---- telemetry
    def update_stats(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """Numbers the trainer logs with every update, as device scalars (no host sync here), or None."""
        return None


def stream_tensors(output) -> list[torch.Tensor]:
    """The tensors of a sub-layer's output stream (one, or ResiDual's two)."""
    return list(output) if isinstance(output, tuple) else [output]
