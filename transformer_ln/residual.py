"""The one place where Post-LN, Pre-LN and Admin differ.

A sub-layer i with branch function f_i and a_i = Dropout(f_i(.)) computes, per scheme
(Liu et al. 2020, "Understanding the Difficulty of Training Transformers", arXiv 2004.08249):

    post_ln   x_i = LN(x_{i-1} + a_i),            a_i = Dropout(f_i(x_{i-1}))       no final LN
    pre_ln    x_i = x_{i-1} + a_i,                a_i = Dropout(f_i(LN(x_{i-1})))   final LN per stack
    admin     x_i = LN(omega_i * x_{i-1} + a_i),  a_i = Dropout(f_i(x_{i-1}))       no final LN

A ``ResidualScheme`` says, at build time, where the norms go and which ``Residual`` combines the shortcut and the
branch. ``Sublayer.forward`` is the same for every scheme; no layer branches on a scheme's name. A new scheme
(DeepNorm's alpha, ReZero's branch scale) is a subclass and an entry in ``SCHEMES``.

Analysis tools attach forward hooks to ``Residual`` modules: the hook's positional inputs are exactly the shortcut
x_{i-1} and the branch output a_i, and its output is the pre-norm sum.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import Dropout

OUTPUT_CHANGE_SCALES = ("O(logn)", "O(n)", "O(1)")


def calculate_init(num_res_layers: int, output_change_scale: str = "O(logn)") -> float:
    """Admin's closed-form shortcut scale omega for a stack of ``num_res_layers`` residual sub-layers.

    Same values as admin-torch: ``O(logn)``: sqrt((n+1)/ln(n+1) - 1); ``O(n)``: 1 (vanilla Post-LN);
    ``O(1)``: sqrt(n). Count 2 sub-layers per encoder layer and 3 per decoder layer.
    """
    if isinstance(num_res_layers, bool) or not isinstance(num_res_layers, int) or num_res_layers < 1:
        raise ValueError(f"num_res_layers: got {num_res_layers!r}, must be an integer >= 1 "
                         "(2 per encoder layer, 3 per decoder layer)")
    n = num_res_layers
    if output_change_scale in ("O(logn)", "default"):
        return math.sqrt((n + 1) / math.log(n + 1) - 1)
    if output_change_scale == "O(n)":
        return 1.0
    if output_change_scale == "O(1)":
        return math.sqrt(n)
    raise ValueError(f"output_change_scale: got {output_change_scale!r}, allowed: "
                     f"{', '.join(map(repr, OUTPUT_CHANGE_SCALES))}")


class Residual(nn.Module):
    """The plain shortcut: ``x + f_x``."""

    def forward(self, x: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        return x + f_x


class OmegaResidual(Residual):
    """Admin's shortcut: ``x * omega + f_x``.

    ``omega`` is a trainable per-dimension vector (``as_parameter=True``, what our model and the admin-torch recipes
    use) or a frozen scalar buffer (admin-torch's library default). Either way it is named ``omega`` and lives in the
    state dict, so a checkpoint carries its Admin initialisation.
    """

    def __init__(self, init_value: float = 1.0, as_parameter: bool = False, embed_dim: int | None = None):
        super().__init__()
        if as_parameter:
            if embed_dim is None or embed_dim < 1:
                raise ValueError(f"embed_dim: got {embed_dim!r}; as_parameter=True needs the model width")
            self.omega = nn.Parameter(torch.full((embed_dim,), float(init_value)))
        else:
            self.register_buffer("omega", torch.tensor([float(init_value)]))
        self.init_value = float(init_value)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.omega.fill_(self.init_value)

    def forward(self, x: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        # x * omega + f_x in one kernel (addcmul) rather than two: Admin's step stays close to Post-LN's
        return torch.addcmul(f_x, x, self.omega)

    def extra_repr(self) -> str:
        return f"init_value={self.init_value:.4f}, shape={tuple(self.omega.shape)}"


def _layer_norm(d_model: int) -> nn.Module:
    return nn.LayerNorm(d_model, eps=1e-5)


class ResidualScheme:
    """Where the LayerNorms go and which ``Residual`` combines shortcut and branch (Post-LN by default)."""

    name = "post_ln"
    pre_norm = False   # LN on the branch input
    post_norm = True   # LN on the sum
    final_norm = False  # LN at the end of each stack

    def residual(self, d_model: int, n_sublayers: int, admin_omega: str) -> Residual:
        return Residual()

    def norm(self, enabled: bool, d_model: int) -> nn.Module:
        return _layer_norm(d_model) if enabled else nn.Identity()

    def calibrate(self, model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor, seed: int = 0) -> dict | None:
        """Data-dependent initialisation on one batch before the first update; None if the scheme has none."""
        return None


class PostLN(ResidualScheme):
    """Post-LN (Vaswani et al. 2017): x_i = LN(x_{i-1} + a_i); no final LayerNorm."""


class PreLN(ResidualScheme):
    """Pre-LN (Xiong et al. 2020): x_i = x_{i-1} + Dropout(f_i(LN(x_{i-1}))); LN_final ends each stack."""

    name = "pre_ln"
    pre_norm, post_norm, final_norm = True, False, True


class Admin(ResidualScheme):
    """Admin (Liu et al. 2020): x_i = LN(omega_i * x_{i-1} + a_i), Post-LN's norms with a scaled shortcut.

    omega_i starts at 1 for ``admin_omega='profile'`` until ``transformer_ln.admin_init`` profiles it, or at the
    closed form ``calculate_init(n, admin_omega)`` with n the stack's number of sub-layers.
    """

    name = "admin"

    def residual(self, d_model: int, n_sublayers: int, admin_omega: str) -> Residual:
        init = 1.0 if admin_omega == "profile" else calculate_init(n_sublayers, admin_omega)
        return OmegaResidual(init, as_parameter=True, embed_dim=d_model)

    def calibrate(self, model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor, seed: int = 0) -> dict | None:
        """Profiled omega (``transformer_ln.admin.admin_init``) when ``admin_omega='profile'``."""
        if model.cfg.admin_omega != "profile":
            return None
        from .admin import admin_init  # admin builds on this module

        return admin_init(model, src, tgt_in, seed=seed)


SCHEMES: dict[str, ResidualScheme] = {"post_ln": PostLN(), "pre_ln": PreLN(), "admin": Admin()}


def get_scheme(name: str) -> ResidualScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"residual: got {name!r}, allowed: {', '.join(map(repr, SCHEMES))}") from None


class Sublayer(nn.Module):
    """One residual sub-layer: ``post_norm(residual(x, dropout(branch(pre_norm(x), *ctx))))``.

    The same forward serves every scheme; the scheme only decides at build time whether ``pre_norm`` and
    ``post_norm`` are LayerNorms or identities and which ``Residual`` is used.
    """

    def __init__(self, branch: nn.Module, d_model: int, scheme: ResidualScheme, n_sublayers: int,
                 dropout: float = 0.0, admin_omega: str = "profile"):
        super().__init__()
        self.pre_norm = scheme.norm(scheme.pre_norm, d_model)
        self.branch = branch
        self.dropout = Dropout(dropout)
        self.residual = scheme.residual(d_model, n_sublayers, admin_omega)
        self.post_norm = scheme.norm(scheme.post_norm, d_model)

    def forward(self, x: torch.Tensor, *ctx, **kwargs) -> torch.Tensor:
        a = self.dropout(self.branch(self.pre_norm(x), *ctx, **kwargs))
        return self.post_norm(self.residual(x, a))
