"""Output change under a small parameter perturbation (Liu et al. 2020, Sec. 3; TC ``--plot_stability``).

    Delta F = |F(x, W) - F(x, W*)|_2^2,      W* = W + eps * sign(noise)      (mode="random")
                                              W* = W - eps * sign(dL/dW)      (mode="grad_sign", Adam's first step)

F is each stack's output: the encoder output (``model.encode``, after Pre-LN's final LayerNorm) and the decoder's
final hidden state (after its final LayerNorm, before the vocabulary projection). The norm is the squared L2 norm
over the whole (B, T, D) tensor with pad positions left out. Perturbed: every parameter except biases, norm
parameters and the residual combiners' scales (Admin's omega, ReZero's alpha), as the reference code; the embedding
matrices are weights and do move. The decoder's change includes what reaches it through the perturbed encoder
output: it is the change of the full model up to the decoder's last hidden state.

Evaluated in eval mode (the reference ran in train mode, so dropout noise leaked into the difference) with
``torch.func.functional_call`` on perturbed copies: the model's own parameters are never written.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..norms import is_norm
from ..residual import Residual
from .hooks import STACKS, pad_masks
from .hooks import mode as train_mode

MODES = ("random", "grad_sign")


class _Stacks(nn.Module):
    """Runs the encoder and (optionally) the decoder stack; ``functional_call`` swaps the parameters in."""

    def __init__(self, model: nn.Module, stacks: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.stacks = stacks

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> dict[str, torch.Tensor]:
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
    """Next-token targets when none are given: ``tgt_in`` shifted left by one, a pad appended."""
    return F.pad(tgt_in[:, 1:], (0, 1), value=pad_id)


def token_loss(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy over non-pad targets (no label smoothing: the plain NLL)."""
    logits = model(src, tgt_in)
    if logits.dtype in (torch.float16, torch.bfloat16):  # the softmax in at least float32
        logits = logits.float()
    return F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=model.cfg.pad_id)


def _moved(model: nn.Module, names: list[str], mode_: str, eps: float, generator: torch.Generator,
           src, tgt_in, tgt_out) -> dict[str, torch.Tensor]:
    """Perturbed copies W* of the named parameters (the originals are only read)."""
    params = dict(model.named_parameters())
    if mode_ == "random":
        # noise drawn on the CPU, so the perturbation does not depend on the device
        signs = (torch.randn(params[n].shape, generator=generator).sign_() for n in names)
    else:
        with torch.enable_grad():
            loss = token_loss(model, src, tgt_in, tgt_out)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        signs = (torch.zeros_like(params[n]) if g is None else -torch.sign(g) for n, g in zip(names, grads))
    return {f"model.{n}": params[n].detach().clone().add_(d.to(params[n].device, params[n].dtype), alpha=eps)
            for n, d in zip(names, signs)}


@torch.no_grad()
def output_change(model: nn.Module, src: torch.Tensor, tgt_in: torch.Tensor, eps: float = 1e-4,
                  mode: str = "random", n_samples: int = 1, seed: int = 0, tgt_out: torch.Tensor | None = None,
                  stacks: tuple[str, ...] = STACKS) -> dict[str, float]:
    """``{"encoder": Delta F_enc, "decoder": Delta F_dec}``, each averaged over ``n_samples`` perturbations.

    Args:
        model: an unwrapped ``Seq2SeqTransformer``; parameters stay bit-identical, train/eval flags restored.
        src, tgt_in: int64 (B, S), (B, T). ``tgt_out`` (for ``grad_sign``) defaults to ``tgt_in`` shifted left.
        eps: step size per weight (the reference: 1e-4 random, 1e-6 for its gradient mode).
        mode: "random" (fresh signs per sample, seeded by ``seed``) or "grad_sign" (deterministic; one sample).
        stacks: ("encoder",) skips the decoder (cheaper depth sweeps).
    """
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, allowed: {', '.join(map(repr, MODES))}")
    if n_samples < 1:
        raise ValueError(f"n_samples: got {n_samples}, must be >= 1")
    bad = [s for s in stacks if s not in STACKS]
    if bad or not stacks:
        raise ValueError(f"stacks: got {stacks!r}, allowed: a subset of {STACKS}")
    keep = pad_masks(model, src, tgt_in)
    if tgt_out is None:
        tgt_out = default_tgt_out(tgt_in, model.cfg.pad_id)
    wrapper = _Stacks(model, tuple(stacks))
    names = perturbed_names(model)
    generator = torch.Generator().manual_seed(seed)
    totals = {s: 0.0 for s in stacks}
    samples = 1 if mode == "grad_sign" else n_samples
    with train_mode(model, False):
        base = wrapper(src, tgt_in)
        for _ in range(samples):
            moved = _moved(model, names, mode, eps, generator, src, tgt_in, tgt_out)
            new = functional_call(wrapper, moved, (src, tgt_in), tie_weights=True, strict=False)
            del moved
            for s in stacks:
                diff = (new[s] - base[s]).double()[keep[s]]  # (n_real_tokens, D)
                totals[s] += diff.pow(2).sum().item()
    return {s: v / samples for s, v in totals.items()}
