"""Admin (Liu et al. 2020) whole: the scheme, its shortcut module, its closed form and its profiling.

    x_i = LN(omega_i * x_{i-1} + a_i),   a_i = Dropout(f_i(x_{i-1}))      Post-LN's norms with a scaled shortcut

Drop-in for admin-torch users::

    residual = transformer_ln.model.admin.as_module(num_res_layers=2 * n_layers, as_parameter=True, embed_dim=d)
    x = layer_norm(residual(x, dropout(f(x))))      # = LN(x * omega + f(x))

``admin_init`` is Admin's profiling (Liu et al. 2020, Sec. 4; Transformer-Clinic's ``adaptive-profiling``): one
forward pass in sub-layer order, each stack with its own running value r that starts at 1::

    omega_i <- r
    r       <- sqrt(Var[omega_i * x_{i-1}] + Var[a_i])

so omega_i^2 ~ Var[x_0] + sum_{j<i} Var[a_j]. Variances are scalars over all hidden units of the non-pad positions
(the reference code also counted padding). The forward runs in train mode, as the reference does, so dropout noise
enters Var[a_i]; the RNG is seeded and restored, so the result is deterministic given the batch and ``seed``.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .sublayer import STACKS, Residual, ResidualScheme, SchemeOption, Site

OUTPUT_CHANGE_SCALES = ("O(logn)", "O(n)", "O(1)")
ADMIN_OMEGAS = ("profile", *OUTPUT_CHANGE_SCALES)
NO_OMEGA_GIVEN = ("residual='admin' without admin_omega: every omega starts at 1 (plain Post-LN) until "
                  "transformer_ln.admin_init(stack, x) profiles it on a batch; pass admin_omega='O(logn)' (with "
                  "n_sublayers) for admin-torch's closed form, or admin_omega='profile' to say you will profile")

__all__ = ["Admin", "calculate_init", "as_module", "OmegaResidual", "admin_init", "omega_summary",
           "OUTPUT_CHANGE_SCALES", "ADMIN_OMEGAS"]


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

    def scales(self):
        return self.omega, None

    def forward(self, x: torch.Tensor, f_x: torch.Tensor) -> torch.Tensor:
        # x * omega + f_x in one kernel (addcmul) rather than two: Admin's step stays close to Post-LN's
        return torch.addcmul(f_x, x, self.omega)

    def extra_repr(self) -> str:
        return f"init_value={self.init_value:.4f}, shape={tuple(self.omega.shape)}"


class Admin(ResidualScheme):
    """Admin (Liu et al. 2020, arXiv 2004.08249): x_i = LN(omega_i * x_{i-1} + a_i); no final norm.

    omega_i is a trainable vector per sub-layer. It starts at 1 for ``admin_omega='profile'`` until ``calibrate``
    (``admin_init``) profiles it on the first batch, or at the closed form ``calculate_init(n, admin_omega)`` with n
    the stack's number of sub-layers (admin-torch's constants).
    """

    name, label, color = "admin", "Admin", "tab:green"
    options = {"admin_omega": SchemeOption("profile", "Admin's shortcut scale: profile (the paper's profiling) or a "
                                           "closed form of admin-torch", ADMIN_OMEGAS)}
    curve_panels = (("omega_mean", "Admin omega", ("omega_min", "omega_max")),)

    def __init__(self, norm: str = "layernorm", norm_eps: float | None = None, **options):
        super().__init__(norm, norm_eps, **options)
        if "admin_omega" not in options:  # a layer built alone (a model passes its config's choice)
            warnings.warn(NO_OMEGA_GIVEN, UserWarning, stacklevel=5)

    def needs_stack_size(self) -> bool:
        return self.admin_omega != "profile"  # the closed forms read n

    def residual(self, site: Site) -> OmegaResidual:
        init = 1.0 if self.admin_omega == "profile" else calculate_init(site.n_sublayers, self.admin_omega)
        return OmegaResidual(init, as_parameter=True, embed_dim=site.d_model)

    def calibrate(self, model: nn.Module, *inputs: torch.Tensor, seed: int = 0) -> dict | None:
        """Profiled omega (``admin_init``) when the model was built with ``admin_omega='profile'``."""
        scheme, cfg = getattr(model, "scheme", None), getattr(model, "cfg", None)
        omega = getattr(scheme, "admin_omega", getattr(cfg, "admin_omega", self.admin_omega))
        if omega != "profile":  # the model's own choice, whichever instance of the scheme is asked
            return None
        return admin_init(model, *inputs, seed=seed)

    def calibration_note(self, profile: dict) -> str:
        return "Admin profile: " + ", ".join(f"{stack} omega {w[0]:.3f} .. {w[-1]:.3f}"
                                             for stack, w in profile.items() if w)

    def update_stats(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """omega's min, mean and max over every entry, before the update (what the curves figure bands)."""
        summary = omega_summary(model)
        return None if summary is None else dict(zip(("omega_min", "omega_mean", "omega_max"), summary))


def as_module(num_res_layers: int, output_change_scale: str = "O(logn)", as_parameter: bool = False,
              embed_dim: int | None = None) -> OmegaResidual:
    """A module whose ``forward(x, f_x)`` is ``x * omega + f_x`` with omega = ``calculate_init(...)``.

    Args:
        num_res_layers: residual sub-layers in the stack (2 per encoder layer, 3 per decoder layer).
        output_change_scale: "O(logn)" (default), "O(n)" (vanilla Post-LN) or "O(1)".
        as_parameter: a trainable vector of size ``embed_dim`` instead of a frozen scalar buffer.
    """
    return OmegaResidual(calculate_init(num_res_layers, output_change_scale), as_parameter, embed_dim)


def _stack_of_or_none(name: str) -> str | None:
    try:
        return _stack_of(name)
    except ValueError:
        return None


def _stack_of(name: str) -> str:
    parts = name.split(".")
    for stack in STACKS:
        if stack in parts:
            return stack
    raise ValueError(f"cannot tell which stack {name!r} belongs to; pass the unwrapped Seq2SeqTransformer")


@torch.no_grad()
def admin_init(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor | None = None, seed: int = 0,
               train_mode: bool = True, count_padding: bool = False,
               keep: torch.Tensor | None = None) -> dict[str, list[float]]:
    """Profile omega for every Admin sub-layer on one batch and write it into the model.

    Args:
        model: an (unwrapped) ``Seq2SeqTransformer`` with ``residual='admin'``, called as ``model(src, tgt_in)``;
            or, with ``tgt_in=None``, any module built from our Admin layers (an ``nn.Sequential`` of
            ``EncoderLayer``s, your own stack), called as ``model(src)`` and profiled as one stack.
        src, tgt_in: one batch, int64 (B, S) and (B, T); the same batch on every process gives the same omega.
            For a plain stack ``src`` is its input, e.g. float (B, T, D).
        seed: seeds the dropout masks of the profiling pass (the caller's RNG state is restored).
        train_mode: profile with dropout on (the reference) or off.
        count_padding: let pad positions enter the variances, as the reference's ``np.var`` over the whole tensor.
        keep: a plain stack's bool (B, T), True at real positions (default: every position counts).
    Returns:
        ``{"encoder": [omega_1, ...], "decoder": [...]}``, or ``{"stack": [...]}`` for a plain stack. No parameter
        other than omega changes.
    """
    residuals = [(n, m) for n, m in model.named_modules() if isinstance(m, OmegaResidual)]
    if not residuals:
        raise ValueError("admin_init needs a model built with model.residual='admin' (or Admin layers)")
    if tgt_in is not None:
        if not hasattr(model, "cfg") or any(_stack_of_or_none(n) is None for n, _ in residuals):
            raise ValueError(f"admin_init(model, src, tgt_in): {type(model).__name__} is not our Seq2SeqTransformer "
                             "(no .cfg.pad_id, or Admin layers outside encoder/decoder stacks); for your own stack "
                             "call admin_init(stack, x, keep=mask) without tgt_in: it runs stack(x) and profiles "
                             "its Admin layers as one stack")
        pad_id = model.cfg.pad_id
        masks = {"encoder": src.ne(pad_id), "decoder": tgt_in.ne(pad_id)}
        stack_of, inputs = _stack_of, (src, tgt_in)
    else:
        masks, inputs = {"stack": keep}, (src,)

        def stack_of(name: str) -> str:
            return "stack"
    running = {s: 1.0 for s in masks}
    profile: dict[str, list[float]] = {s: [] for s in masks}

    def make_hook(stack: str):
        def hook(module: OmegaResidual, inputs):
            x, a = inputs
            module.omega.fill_(running[stack])
            profile[stack].append(running[stack])
            m = slice(None) if count_padding or masks[stack] is None else masks[stack]
            var = (x * module.omega)[m].double().var(unbiased=False) + a[m].double().var(unbiased=False)
            running[stack] = math.sqrt(var.item())
        return hook

    flags = {m: m.training for m in model.modules()}
    handles = [m.register_forward_pre_hook(make_hook(stack_of(n))) for n, m in residuals]
    devices = [src.device] if src.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            model.train(train_mode)
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags.items():
            m.training = flag
    return profile


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A parameter's full value; under FSDP (a sharded DTensor) gathered from every process (collective)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def omega_summary(model: nn.Module) -> torch.Tensor | None:
    """[min, mean, max] of all omega entries as one device tensor (no host sync), or None without Admin."""
    omegas = [_whole(m.omega).detach().float().reshape(-1) for m in model.modules() if isinstance(m, OmegaResidual)]
    if not omegas:
        return None
    flat = torch.cat(omegas)
    return torch.stack([flat.min(), flat.mean(), flat.max()])
