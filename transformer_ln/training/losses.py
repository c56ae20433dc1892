"""Label-smoothed cross-entropy with fairseq's convention.

With eps_i = eps / (V - 1) (fairseq's ``label_smoothed_nll_loss``)::

    loss = (1 - eps - eps_i) * nll + eps_i * sum_v(-log p_v)

i.e. the true class gets 1 - eps and every other class eps / (V - 1). torch's ``CrossEntropyLoss(label_smoothing=
eps)`` spreads eps over all V classes instead (a slightly different constant). Pad positions are masked; sums are
returned so the trainer can divide by the global number of target tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def label_smoothed_nll_loss(logits: torch.Tensor, target: torch.Tensor, eps: float,
                            pad_id: int, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), target (B, T) -> (smoothed loss summed over tokens, nll summed over tokens), in fp32.

    ``z_loss`` = c adds c * (log Z)^2 per target token to the loss (not to the nll), Z = sum_v exp(logit_v): PaLM's
    auxiliary loss (Chowdhery et al. 2022, arXiv 2204.02311; c = 1e-4 there and in Wortsman et al. 2023), which
    keeps log Z near 0 so the output logits cannot drift (the divergence Wortsman et al. describe).
    """
    if z_loss > 0.0:
        log_z = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        lprobs = logits.float() - log_z
    else:
        lprobs = F.log_softmax(logits.float(), dim=-1)
    target = target.unsqueeze(-1)
    nll = -lprobs.gather(-1, target).squeeze(-1)
    smooth = -lprobs.sum(-1)
    keep = target.squeeze(-1).ne(pad_id)
    nll = nll.masked_fill(~keep, 0.0).sum()
    smooth = smooth.masked_fill(~keep, 0.0).sum()
    eps_i = eps / (logits.shape[-1] - 1)
    loss = (1.0 - eps - eps_i) * nll + eps_i * smooth
    if z_loss > 0.0:
        loss = loss + z_loss * log_z.squeeze(-1).pow(2).masked_fill(~keep, 0.0).sum()
    return loss, nll
