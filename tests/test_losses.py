"""fairseq's label smoothing and inverse-sqrt schedule against independent references."""
import math

import pytest
import torch

from transformer_ln.training.losses import label_smoothed_nll_loss
from transformer_ln.training.schedule import inverse_sqrt_lr


def test_label_smoothed_loss_equals_a_float64_reference():
    torch.manual_seed(0)
    B, T, V, pad, eps = 3, 5, 11, 0, 0.1
    logits = torch.randn(B, T, V)
    target = torch.randint(1, V, (B, T))
    target[0, 3:] = pad
    loss, nll = label_smoothed_nll_loss(logits, target, eps, pad)
    want_loss = want_nll = 0.0
    for b in range(B):
        for t in range(T):
            y = int(target[b, t])
            if y == pad:
                continue
            row = logits[b, t].double()
            logp = row - torch.logsumexp(row, 0)
            q = torch.full((V,), eps / (V - 1), dtype=torch.float64)
            q[y] = 1 - eps  # the true class keeps 1 - eps, the others share eps
            want_loss += float(-(q * logp).sum())
            want_nll += float(-logp[y])
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert nll.item() == pytest.approx(want_nll, rel=1e-6)


@pytest.mark.parametrize("t", [0, 1, 50, 99, 100, 101, 400, 10_000])
def test_inverse_sqrt_schedule_is_fairseqs(t):
    lr, warmup, init = 7e-4, 100, 1e-7
    if t < warmup:
        want = init + t * (lr - init) / warmup
    else:
        want = lr * warmup ** 0.5 * t ** -0.5
    assert inverse_sqrt_lr(t, lr, warmup, init) == pytest.approx(want, rel=1e-12)
    assert inverse_sqrt_lr(t, lr, 0) == pytest.approx(lr / math.sqrt(max(t, 1)), rel=1e-12)


def test_inverse_sqrt_schedule_peaks_at_warmup_and_halves_at_four_times_it():
    lr, warmup, init = 7e-4, 100, 1e-7
    assert inverse_sqrt_lr(warmup, lr, warmup, init) == pytest.approx(lr, rel=1e-12)
    assert inverse_sqrt_lr(4 * warmup, lr, warmup, init) == pytest.approx(lr / 2, rel=1e-12)
    assert inverse_sqrt_lr(warmup - 1, lr, warmup, init) < lr and inverse_sqrt_lr(warmup + 1, lr, warmup, init) < lr
