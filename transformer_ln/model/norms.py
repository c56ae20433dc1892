"""The normalisations a residual scheme can place (``model.norm``), one factory for all of them.

    layernorm  LN(x)  = (x - mean(x)) / sqrt(var(x) + eps) * g + b      over one position's D units (Ba et al. 2016)
    rmsnorm    RMS(x) = x / sqrt(mean(x^2) + eps) * g                   (Zhang and Sennrich 2019)
    dyt        DyT(x) = g * tanh(alpha * x) + b, one scalar alpha from 0.5 (Zhu et al. 2025, arXiv 2503.10622)
    batchnorm  BN(x)  = (x - mu_B) / sqrt(var_B + eps) * g + b, mu_B/var_B over the batch's non-pad positions in
               training, running averages at eval time (Ioffe and Szegedy 2015)

``BatchNorm.forward(x, keep)`` also takes ``keep`` (bool, x's leading shape, True at real tokens): its statistics must
not count padding; ``apply_norm`` passes it to the norms that want it. ``decompose(parts, x)`` is a norm's linear
part applied to components whose sum is its input x: ``sum(decompose(parts, x)) + shift == norm(x)`` with a shift
that does not depend on how x is split. The residual-dependency analysis uses it, so it needs no norm-name branches.
"""
from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5
DEFAULT_NORM = "layernorm"


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and state dict) with a decomposition."""

    def __init__(self, d_model: int, eps: float = EPS):
        super().__init__(d_model, eps=eps)

    def decompose(self, parts: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """g * (c - mean(c)) / sigma(x) per component (the bias is the shift)."""
        x = x.to(parts[0].dtype)
        sigma = torch.sqrt(x.var(dim=-1, unbiased=False, keepdim=True) + self.eps)
        g = self.weight.detach().to(x.dtype)
        return [g * (c - c.mean(dim=-1, keepdim=True)) / sigma for c in parts]


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` with an explicit eps (1e-5, as our LayerNorm) and a decomposition."""

    def __init__(self, d_model: int, eps: float = EPS):
        super().__init__(d_model, eps=eps)

    def decompose(self, parts: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """g * c / rms(x) per component (no shift)."""
        x = x.to(parts[0].dtype)
        rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        g = self.weight.detach().to(x.dtype)
        return [g * c / rms for c in parts]


class DyT(nn.Module):
    """Dynamic tanh, g * tanh(alpha * x) + b: a norm without statistics (Zhu et al. 2025).

    alpha is one learnable scalar per norm, starting at ``alpha_init`` = 0.5 (the paper's default for LN-free
    Transformers); g starts at 1 and b at 0, as LayerNorm's affine part.
    """

    def __init__(self, d_model: int, alpha_init: float = 0.5):
        super().__init__()
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.full((1,), self.alpha_init))
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.alpha_init)
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.alpha * x) * self.weight + self.bias

    def decompose(self, parts: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """g * c * tanh(alpha x) / x elementwise (the secant slope; alpha where x = 0), so the parts sum exactly."""
        x = x.to(parts[0].dtype)
        alpha = self.alpha.detach().to(x.dtype)
        safe = torch.where(x == 0, torch.ones_like(x), x)
        slope = torch.where(x == 0, alpha.expand_as(x), torch.tanh(alpha * x) / safe)
        g = self.weight.detach().to(x.dtype)
        return [g * slope * c for c in parts]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, alpha_init={self.alpha_init}"


class BatchNorm(nn.Module):
    """BatchNorm over (batch, positions) of the non-pad tokens; running averages at eval time.

    In training mode mu and var (biased) are taken over the positions where ``keep`` is True (all positions if
    ``keep`` is None), every position is normalised with them, and the running averages move by ``momentum`` (with
    the unbiased variance, as ``nn.BatchNorm1d``). In eval mode the running averages are used, so incremental
    decoding (one token at a time) gives the same output as a full forward. Statistics are per process: with
    several processes each normalises with its own shard's batch (no SyncBatchNorm).
    """

    def __init__(self, d_model: int, eps: float = EPS, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("running_mean", torch.zeros(d_model))
        self.register_buffer("running_var", torch.ones(d_model))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            rows = x.reshape(-1, x.shape[-1]) if keep is None else x[keep]  # (n_tokens, D)
            if rows.shape[0] < 2:
                raise ValueError(f"BatchNorm in training mode needs at least 2 non-pad tokens, got {rows.shape[0]}")
            var, mean = torch.var_mean(rows, dim=0, unbiased=False)
            with torch.no_grad():
                n = rows.shape[0]
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_((var.detach() * (n / (n - 1))).to(self.running_var.dtype), self.momentum)
                self.num_batches_tracked.add_(1)
        return (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + self.eps) * self.weight + self.bias

    def decompose(self, parts: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """g * c / sqrt(running_var + eps) per component (eval mode; the running mean goes into the shift)."""
        if self.training:
            raise ValueError("BatchNorm.decompose needs eval mode (running statistics)")
        dtype = parts[0].dtype
        scale = self.weight.detach().to(dtype) * torch.rsqrt(self.running_var.to(dtype) + self.eps)
        return [scale * c for c in parts]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, momentum={self.momentum}"


class ScaledNorm(nn.Module):
    """s * N(x) with a constant s: LayerNorm Scaling's 1/sqrt(l) on a pre-norm. Holds the norm (``.norm``), so its
    parameters, init and ``keep`` handling are the norm's; ``decompose`` is s times the norm's."""

    def __init__(self, norm: nn.Module, scale: float):
        super().__init__()
        self.norm, self.scale = norm, float(scale)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return apply_norm(self.norm, x, keep) * self.scale

    def decompose(self, parts: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        return [self.scale * c for c in self.norm.decompose(parts, x)]

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"


NORMS: dict[str, type[nn.Module]] = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "dyt": DyT,
                                     "batchnorm": BatchNorm}
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, DyT, BatchNorm)


def make_norm(kind: str, d_model: int, eps: float | None = None) -> nn.Module:
    """The norm named ``kind`` (a key of ``NORMS``) over ``d_model`` units, at its initial values; ``eps`` (None:
    ``EPS``) where the norm has one (DyT has none)."""
    try:
        cls = NORMS[kind]
    except KeyError:
        raise ValueError(f"norm: got {kind!r}, allowed: {', '.join(map(repr, NORMS))}") from None
    return cls(d_model) if eps is None or cls is DyT else cls(d_model, eps=eps)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def uses_batch_statistics(module: nn.Module) -> bool:
    """True if some norm inside ``module`` normalises with batch statistics (it then needs the pad mask)."""
    return any(isinstance(m, BatchNorm) for m in module.modules())


def apply_norm(norm: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``norm(x, keep)`` for BatchNorm, ``norm(x)`` for every other norm, ``nn.Identity`` and users' own modules."""
    return norm(x) if keep is None or not isinstance(norm, (BatchNorm, ScaledNorm)) else norm(x, keep)


__all__ = ["DEFAULT_NORM", "LayerNorm", "RMSNorm", "DyT", "BatchNorm", "ScaledNorm", "NORMS", "NORM_TYPES", "make_norm", "is_norm",
           "uses_batch_statistics", "apply_norm"]
