"""Each scheme's sub-layer against its formula in float64, and against torch.nn's Transformer layers."""
import math

import pytest
import torch
from torch import nn

from transformer_ln import DecoderLayer, EncoderLayer, Sublayer
from transformer_ln.model.layers import FeedForward, SelfAttention
from transformer_ln.model.schemes import OmegaResidual, get_scheme

D, H, F = 16, 4, 32


def ln64(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * g + b


def randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial LayerNorm gains/biases and omega, so the formula check sees them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def ffn64(x, ffn: FeedForward):
    w1, b1 = ffn.fc1.weight.double(), ffn.fc1.bias.double()
    w2, b2 = ffn.fc2.weight.double(), ffn.fc2.bias.double()
    return torch.relu(x @ w1.T + b1) @ w2.T + b2


def attn64(x, att: SelfAttention):
    B, T, _ = x.shape
    w, b = att.qkv_proj.weight.double(), att.qkv_proj.bias.double()
    q, k, v = (x @ w.T + b).split(D, dim=-1)
    split = lambda t: t.view(B, T, H, D // H).transpose(1, 2)  # noqa: E731  (B, H, T, Dh)
    q, k, v = split(q), split(k), split(v)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
    out = (p @ v).transpose(1, 2).reshape(B, T, D)
    return out @ att.out_proj.weight.double().T + att.out_proj.bias.double()


def expected(scheme: str, x, sub: Sublayer, f):
    if scheme == "pre_ln":
        n = sub.pre_norm
        return x + f(ln64(x, n.weight.double(), n.bias.double()))
    skip = x * sub.residual.omega.double() if scheme == "admin" else x
    n = sub.post_norm
    return ln64(skip + f(x), n.weight.double(), n.bias.double())


@pytest.mark.parametrize("kind", ["ffn", "self_attn"])
def test_sublayer_equals_its_formula_in_float64(scheme, kind):
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, F, dropout=0.0, residual=scheme, n_sublayers=12, admin_omega="O(logn)")
    randomize(layer)
    sub = getattr(layer, kind)
    x = torch.randn(3, 5, D)
    f = (lambda t: ffn64(t, sub.branch)) if kind == "ffn" else (lambda t: attn64(t, sub.branch))
    want = expected(scheme, x.double(), sub, f)
    got = sub(x) if kind == "ffn" else sub(x, None)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_admin_omega_is_a_trainable_vector_in_the_state_dict():
    layer = EncoderLayer(D, H, F, residual="admin", n_sublayers=12, admin_omega="O(logn)")
    sd = layer.state_dict()
    assert "self_attn.residual.omega" in sd and "ffn.residual.omega" in sd
    assert sd["ffn.residual.omega"].shape == (D,)
    assert isinstance(layer.ffn.residual.omega, nn.Parameter) and layer.ffn.residual.omega.requires_grad
    assert torch.allclose(sd["ffn.residual.omega"], torch.full((D,), 2.017), atol=5e-4)
    for scheme in ("post_ln", "pre_ln"):
        assert not any("omega" in k for k in EncoderLayer(D, H, F, residual=scheme).state_dict())


def test_norm_placement_per_scheme():
    for name, pre, post in [("post_ln", False, True), ("pre_ln", True, False), ("admin", False, True)]:
        s = get_scheme(name)
        assert (s.pre_norm, s.post_norm, s.final_norm) == (pre, post, name == "pre_ln")
        layer = EncoderLayer(D, H, F, residual=name)
        assert isinstance(layer.ffn.pre_norm, nn.LayerNorm) == pre
        assert isinstance(layer.ffn.post_norm, nn.LayerNorm) == post
        assert isinstance(layer.ffn.residual, OmegaResidual) == (name == "admin")


def _copy_attention(ours, theirs: nn.MultiheadAttention) -> None:
    if hasattr(ours, "qkv_proj"):
        ours.qkv_proj.weight.copy_(theirs.in_proj_weight)
        ours.qkv_proj.bias.copy_(theirs.in_proj_bias)
    else:
        ours.q_proj.weight.copy_(theirs.in_proj_weight[:D])
        ours.q_proj.bias.copy_(theirs.in_proj_bias[:D])
        ours.kv_proj.weight.copy_(theirs.in_proj_weight[D:])
        ours.kv_proj.bias.copy_(theirs.in_proj_bias[D:])
    ours.out_proj.weight.copy_(theirs.out_proj.weight)
    ours.out_proj.bias.copy_(theirs.out_proj.bias)


def _copy_ffn_and_norms(ours, theirs, subs, norms) -> None:
    ours.ffn.branch.fc1.load_state_dict(theirs.linear1.state_dict())
    ours.ffn.branch.fc2.load_state_dict(theirs.linear2.state_dict())
    for sub, norm in zip(subs, norms):
        target = sub.pre_norm if isinstance(sub.pre_norm, nn.LayerNorm) else sub.post_norm
        target.load_state_dict(norm.state_dict())


@pytest.mark.parametrize("norm_first,scheme", [(False, "post_ln"), (True, "pre_ln")])
@torch.no_grad()
def test_encoder_layer_equals_torch_nn(norm_first, scheme):
    torch.manual_seed(1)
    ref = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    randomize(ref, 1)
    ours = EncoderLayer(D, H, F, dropout=0.0, residual=scheme).eval()
    _copy_attention(ours.self_attn.branch, ref.self_attn)
    _copy_ffn_and_norms(ours, ref, [ours.self_attn, ours.ffn], [ref.norm1, ref.norm2])
    x = torch.randn(2, 7, D)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    want = ref(x, src_key_padding_mask=pad)
    got = ours(x, ~pad[:, None, None, :])
    keep = ~pad
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first,scheme", [(False, "post_ln"), (True, "pre_ln")])
@torch.no_grad()
def test_decoder_layer_equals_torch_nn(norm_first, scheme):
    torch.manual_seed(2)
    ref = nn.TransformerDecoderLayer(D, H, F, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    randomize(ref, 2)
    ours = DecoderLayer(D, H, F, dropout=0.0, residual=scheme).eval()
    _copy_attention(ours.self_attn.branch, ref.self_attn)
    _copy_attention(ours.cross_attn.branch, ref.multihead_attn)
    _copy_ffn_and_norms(ours, ref, [ours.self_attn, ours.cross_attn, ours.ffn], [ref.norm1, ref.norm2, ref.norm3])
    y, mem = torch.randn(2, 6, D), torch.randn(2, 9, D)
    mem_pad = torch.zeros(2, 9, dtype=torch.bool)
    mem_pad[0, 7:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    want = ref(y, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mem_pad)
    got = ours(y, mem, ~mem_pad[:, None, None, :])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
