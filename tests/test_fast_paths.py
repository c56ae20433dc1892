"""The CPU fast paths compute what the plain torch functions compute (issue 7's speed work must not change math)."""
import pytest
import torch
import torch.nn.functional as F

from transformer_ln.model.layers import Dropout, _attention_with_dropout_cpu, dropout


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_equals_sdpa_without_dropout(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = None if causal else torch.rand(3, 1, 1, 6) > 0.4
    if mask is not None:
        mask[..., 0] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    got = _attention_with_dropout_cpu(q, k, v, mask, causal, 0.0)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g))


def test_cpu_attention_with_cached_prefix_is_causal_from_the_end():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    allowed = torch.ones(3, 5, dtype=torch.bool).tril(2)
    torch.testing.assert_close(_attention_with_dropout_cpu(q, k, v, None, True, 0.0),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=allowed))


def test_dropout_keeps_one_minus_p_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    y = dropout(x, 0.1, True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # gradient is the same mask and scale
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x


def test_dropout_module_follows_train_and_eval_and_seed():
    m = Dropout(0.5)
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = m(x)
    torch.manual_seed(3)
    assert torch.equal(a, m(x))
    assert torch.equal(m.eval()(x), x)
