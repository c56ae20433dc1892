"""The decoder-only model: presets, components, decoder-only constants, positions and the cache."""
import math

import pytest
import torch
import torch.nn.functional as F

from transformer_ln import CausalLM, ModelConfig, Seq2SeqTransformer, build_model
from transformer_ln.config.parser import resolve_config
from transformer_ln.model.admin import calculate_init
from transformer_ln.model.positions import Rotary, apply_rotary


def lm(**kw) -> CausalLM:
    torch.manual_seed(0)
    base = dict(arch="decoder_only", d_model=32, n_heads=4, d_ff=64, n_dec_layers=3, tgt_vocab_size=50,
                dropout=0.0, max_positions=64)
    return build_model(ModelConfig(**{**base, **kw}))


def test_build_model_follows_arch_and_presets_fill_what_is_not_given():
    assert isinstance(lm(), CausalLM)
    assert isinstance(build_model(ModelConfig(src_vocab_size=9, tgt_vocab_size=9, d_model=8, n_heads=2, d_ff=8,
                                              n_enc_layers=1, n_dec_layers=1)), Seq2SeqTransformer)
    llama = ModelConfig(preset="llama", bias=True)
    assert (llama.arch, llama.positions, llama.activation, llama.norm, llama.tie_embeddings, llama.bias) == (
        "decoder_only", "rope", "swiglu", "rmsnorm", False, True)  # bias given beside the preset wins
    assert ModelConfig.from_dict(llama.to_dict()) == llama
    cli = resolve_config(["model.preset=gpt2", "model.residual=admin"]).cfg
    assert (cli.model.arch, cli.model.positions, cli.model.residual, cli.task) == (
        "decoder_only", "learned", "admin", "language_model")


def test_components_are_where_the_config_says():
    g = lm(preset="gpt2")
    assert g.lm_head is None and g.output_weight() is g.embed.embed_tokens.weight and g.embed.scale == 1.0
    assert g.embed.learned.weight.shape == (64, 32) and g.rotary is None
    sa = g.layers[0].self_attn
    assert sa.pre_norm.bias is not None and sa.branch.qkv_proj.bias is not None
    assert g.layers[0].ffn.branch.act.approximate == "tanh"
    m = lm(preset="llama")
    assert m.lm_head is not None and m.rotary is not None and m.embed.table() is None
    assert m.layers[0].ffn.branch.fc1.weight.shape == (128, 32)  # [gate; up]
    assert all(lin.bias is None for lin in (m.layers[0].self_attn.branch.qkv_proj, m.layers[0].ffn.branch.fc2))
    assert type(m.final_norm).__name__ == "RMSNorm" and m.final_norm.eps == 1e-5
    assert lm(preset="llama", norm_eps=1e-6).final_norm.eps == 1e-6


def test_swiglu_ffn_equals_llamas_formula():
    m = lm(preset="llama").double()
    ffn = m.layers[1].ffn.branch
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    gate, up = ffn.fc1.weight.split(64)
    want = (F.silu(x @ gate.T) * (x @ up.T)) @ ffn.fc2.weight.T
    assert torch.allclose(ffn(x), want, atol=1e-12, rtol=0)


def test_rotary_scores_depend_only_on_relative_position():
    rot = Rotary(8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)

    def score(i, j):
        qi = apply_rotary(q, rot(torch.tensor([i]), torch.float64))
        kj = apply_rotary(k, rot(torch.tensor([j]), torch.float64))
        return (qi * kj).sum().item()

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-12)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-6)
    assert (apply_rotary(q, rot(torch.tensor([5]), torch.float64)).norm() - q.norm()).abs() < 1e-12  # a rotation


def test_decoder_only_constants_of_the_depth_dependent_schemes():
    M = 3
    deep = lm(residual="deepnorm")
    assert deep.layers[0].ffn.residual.alpha == pytest.approx((2 * M) ** 0.25)  # DeepNet's decoder-only row
    assert deep.layers[2].self_attn.site.n_sublayers == 2 * M and deep.layers[2].self_attn.site.index == 5
    admin = lm(residual="admin", admin_omega="O(logn)")
    assert admin.layers[0].self_attn.residual.omega[0].item() == pytest.approx(calculate_init(2 * M, "O(logn)"))
    torch.manual_seed(0)
    sub, pre = lm(residual="subln"), lm(residual="pre_ln")  # the same seed: Sub-LN's init = Pre-LN's x gamma
    gamma = math.sqrt(math.log(2 * M))
    w_sub, w_pre = sub.layers[1].ffn.branch.fc2.weight, pre.layers[1].ffn.branch.fc2.weight
    assert torch.allclose(w_sub, w_pre * gamma, atol=1e-6)


def test_a_causal_model_never_sees_the_future_and_the_cache_equals_recomputing():
    for preset in ("gpt2", "llama"):
        m = lm(preset=preset).eval().double()
        ids = torch.randint(0, 50, (2, 12))
        full = m(ids)
        changed = ids.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % 50
        assert torch.equal(m(changed)[:, :8], full[:, :8])  # positions < 8 unaffected by tokens >= 8
        cache = m.new_cache()
        steps = [m(ids[:, :5], cache)] + [m(ids[:, t:t + 1], cache) for t in range(5, 12)]
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-12, rtol=0)


def test_a_too_long_input_is_one_clear_error():
    with pytest.raises(ValueError, match="max_positions=64"):
        lm(preset="gpt2")(torch.zeros(1, 65, dtype=torch.long))
