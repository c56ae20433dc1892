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
                            pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), target (B, T) -> (smoothed loss summed over tokens, nll summed over tokens), in fp32."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    target = target.unsqueeze(-1)
    nll = -lprobs.gather(-1, target).squeeze(-1)
    smooth = -lprobs.sum(-1)
    keep = target.squeeze(-1).ne(pad_id)
    nll = nll.masked_fill(~keep, 0.0).sum()
    smooth = smooth.masked_fill(~keep, 0.0).sum()
    eps_i = eps / (logits.shape[-1] - 1)
    return (1.0 - eps - eps_i) * nll + eps_i * smooth, nll
