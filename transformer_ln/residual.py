"""The one place where residual schemes differ, and the registry of them (``SCHEMES``).

A sub-layer i with branch function f_i and a_i = Dropout(f_i(.)) computes, per scheme (N encoder layers, M decoder
layers; LN stands for the norm ``model.norm`` picks)::

    post_ln        x_i = LN(x_{i-1} + a_i)                                    no final norm
    pre_ln         x_i = x_{i-1} + Dropout(f_i(LN(x_{i-1})))                  final norm per stack
    admin          x_i = LN(omega_i * x_{i-1} + a_i)                          (``transformer_ln.admin``)

Each scheme is a ``ResidualScheme`` (``transformer_ln.sublayer``): class attributes place the norms, ``residual``
picks the shortcut combiner, ``init_sublayer``/``init_model``/``calibrate`` are its initialisation. Its formula, paper
and initialisation are in its docstring. A new scheme is a subclass here and an entry in ``SCHEMES``; config,
plots, analysis, sweeps and benchmarks read the registry (label and colour live on the scheme).
"""
from __future__ import annotations

from torch import nn

from .admin import Admin, OmegaResidual, calculate_init
from .sublayer import DualSublayer, Residual, ResidualScheme, Site, Sublayer

__all__ = ["SCHEMES", "get_scheme", "scheme_from_config", "ResidualScheme", "Residual", "OmegaResidual",
           "Sublayer", "DualSublayer", "Site", "calculate_init", "PostLN", "PreLN", "Admin"]


class PostLN(ResidualScheme):
    """Post-LN (Vaswani et al. 2017, arXiv 1706.03762): x_i = LN(x_{i-1} + a_i); no final norm. Default init."""


class PreLN(ResidualScheme):
    """Pre-LN (Xiong et al. 2020, arXiv 2002.04745): x_i = x_{i-1} + Dropout(f_i(LN(x_{i-1}))); LN ends each stack.
    Default init."""

    name, label, color = "pre_ln", "Pre-LN", "tab:blue"
    pre_norm, post_norm, final_norm = True, False, True


SCHEMES: dict[str, type[ResidualScheme]] = {cls.name: cls for cls in (PostLN, PreLN, Admin)}


def get_scheme(name: str, **options) -> ResidualScheme:
    """The scheme ``name`` built with its options (``norm``, Admin's ``admin_omega``...).

    As in ``ModelConfig``, an option of another scheme (``admin_omega`` for Post-LN) is accepted and unused; a name
    no scheme knows is an error.
    """
    try:
        cls = SCHEMES[name]
    except KeyError:
        raise ValueError(f"residual: got {name!r}, allowed: {', '.join(map(repr, SCHEMES))}") from None
    known = {"norm"} | {o for c in SCHEMES.values() for o in c.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown scheme option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    return cls(**{k: v for k, v in options.items() if k == "norm" or k in cls.options})


def scheme_from_config(cfg) -> ResidualScheme:
    """The scheme a ``ModelConfig`` names, with its options read from the config."""
    return get_scheme(cfg.residual, norm=getattr(cfg, "norm", "layernorm"),
                      **{k: getattr(cfg, k) for k in SCHEMES[cfg.residual].options})


def is_scheme_module(module: nn.Module) -> bool:
    """A residual combiner (its parameters, omega or alpha, belong to the scheme, not to a branch)."""
    return isinstance(module, Residual)
