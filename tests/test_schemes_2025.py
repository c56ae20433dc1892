"""The schemes and options of 2024-2025: Mix-LN, LayerNorm Scaling, HybridNorm, QK-norm, depth-scaled branches and
z-loss, each against its formula in float64 from the same weights, Mix-LN's layers against Post-LN and Pre-LN
layers with copied weights, one finite update for every scheme x option in both models, and the analyses on each."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from transformer_ln import ConfigError, EncoderLayer, ModelConfig, RunConfig, build_model
from transformer_ln.diagnostics import (angular_distances, attach, attention_logits, hidden_state_stats,
                                        layer_removal, log_partition, site_dependency)
from transformer_ln.model.causal_lm import CausalLayer
from transformer_ln.model.depth_scaling import branch_multiplier, param_groups
from transformer_ln.model.schemes import SCHEMES, get_scheme
from transformer_ln.model.sublayer import Site
from transformer_ln.training.losses import label_smoothed_nll_loss
from transformer_ln.training.update import build_optimizer, set_lr

from test_residual import ln64, randomize
from test_schemes import D, F, H, _branch64, _ln

OPTIONS = [{}, {"qk_norm": True}, {"branch_scale": "depth_mup"}, {"branch_scale": "completep"}, {"z_loss": 1e-4}]


def _site(layer: int, n_layers: int, kind: str = "ffn") -> Site:
    return Site("decoder", kind, layer, 2 * layer + 1, 0, n_layers, D, 2 * n_layers)


def _attn64(x, att, norms: bool):
    """Self-attention (no mask) in float64, with the per-head norms on q, k, v where the attention has them."""
    B, T, _ = x.shape
    q, k, v = (x @ att.qkv_proj.weight.double().T + att.qkv_proj.bias.double()).split(D, dim=-1)
    q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
    if norms:
        q, k, v = (t if isinstance(n, nn.Identity) else _ln(n, t) for t, n in
                   ((q, att.q_norm), (k, att.k_norm), (v, att.v_norm)))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, T, D) @ att.out_proj.weight.double().T + att.out_proj.bias.double()


# ---- Mix-LN


@pytest.mark.parametrize("fraction,n_post", [(0.25, 2), (0.5, 4), (0.0, 0), (1.0, 8)])
def test_mix_ln_layers_are_exactly_post_ln_then_pre_ln_where_the_fraction_says(fraction, n_post):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="decoder_only", residual="mix_ln", mix_ln_fraction=fraction, d_model=D,
                                    n_heads=H, d_ff=F, n_dec_layers=8, tgt_vocab_size=30, dropout=0.0))
    randomize(model)
    x = torch.randn(2, 6, D)
    for i, layer in enumerate(model.layers):
        twin = CausalLayer(D, H, F, dropout=0.0, residual="post_ln" if i < n_post else "pre_ln", layer_index=i,
                           depths=(0, 8))
        twin.load_state_dict(layer.state_dict())  # strict: the same norms in the same slots
        torch.testing.assert_close(layer(x), twin(x), rtol=0, atol=0)
    assert not isinstance(model.final_norm, nn.Identity)  # the final norm is always there


def test_mix_ln_post_ln_count_is_the_papers():
    scheme = get_scheme("mix_ln")  # a = 0.25: 3 of 12 and 6 of 24 layers (the paper's POST_NUM)
    assert [scheme.n_post(_site(0, n)) for n in (12, 24, 6, 1)] == [3, 6, 1, 0]
    with pytest.raises(ConfigError, match=r"model.mix_ln_fraction: got 1.5, must lie in \[0.0, 1.0\]"):
        ModelConfig(residual="mix_ln", mix_ln_fraction=1.5)


# ---- LayerNorm Scaling


@pytest.mark.parametrize("kind", ["ffn", "self_attn"])
def test_lns_sublayer_equals_its_formula_in_float64(kind):
    for layer_index in range(4):
        torch.manual_seed(layer_index)
        layer = EncoderLayer(D, H, F, dropout=0.0, residual="lns", layer_index=layer_index)
        randomize(layer)
        sub = getattr(layer, kind)
        ctx = () if kind == "ffn" else (None,)
        x = torch.randn(3, 5, D)
        f, x64 = _branch64(sub, kind), x.double()
        want = x64 + f(_ln(sub.pre_norm.norm, x64) / math.sqrt(layer_index + 1))  # l counted from 1
        torch.testing.assert_close(sub(x, *ctx).double(), want, atol=1e-5, rtol=1e-5)


def test_lns_scales_each_layers_pre_norms_by_one_over_sqrt_l_and_not_the_final_norm():
    model = build_model(ModelConfig(arch="decoder_only", residual="lns", d_model=D, n_heads=H, d_ff=F,
                                    n_dec_layers=5, tgt_vocab_size=30))
    for i, layer in enumerate(model.layers):
        assert layer.self_attn.pre_norm.scale == layer.ffn.pre_norm.scale == 1 / math.sqrt(i + 1)
    assert isinstance(model.final_norm, nn.LayerNorm)


# ---- HybridNorm


@pytest.mark.parametrize("star", [False, True])
def test_hybridnorm_layer_equals_its_formula_in_float64(star):
    for layer_index in (0, 2):
        torch.manual_seed(layer_index)
        layer = EncoderLayer(D, H, F, dropout=0.0, residual="hybridnorm", hybridnorm_star=star,
                             layer_index=layer_index)
        randomize(layer)
        x = torch.randn(3, 5, D)
        x64, att, ffn = x.double(), layer.self_attn, layer.ffn
        f = _branch64(ffn, "ffn")
        if star and layer_index == 0:  # HybridNorm*: Pre-Norm attention (with QKV-norm) and FFN
            y = x64 + _attn64(_ln(att.pre_norm, x64), att.branch, norms=True)
            want = y + f(_ln(ffn.pre_norm, y))
        else:  # y = x + attn(QKV-norm); x' = N(y) + F(N(y))
            y = _ln(att.post_norm, x64 + _attn64(x64, att.branch, norms=True))
            want = y + f(y)
            assert isinstance(att.pre_norm, nn.Identity) and isinstance(ffn.post_norm, nn.Identity)
        torch.testing.assert_close(layer(x).double(), want, atol=1e-5, rtol=1e-5)


# ---- QK-norm


def test_qk_norm_attention_equals_its_formula_in_float64():
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, F, dropout=0.0, residual="pre_ln", qk_norm=True)
    randomize(layer)
    sub = layer.self_attn
    assert isinstance(sub.branch.v_norm, nn.Identity) and sub.branch.q_norm.normalized_shape == (D // H,)
    x = torch.randn(3, 5, D)
    want = x.double() + _attn64(_ln(sub.pre_norm, x.double()), sub.branch, norms=True)
    torch.testing.assert_close(sub(x, None).double(), want, atol=1e-5, rtol=1e-5)


def test_qk_norm_with_rope_caches_normed_rotated_keys_and_the_logit_reading_sees_the_norm():
    torch.manual_seed(0)
    cfg = ModelConfig(arch="decoder_only", residual="pre_ln", norm="rmsnorm", qk_norm=True, positions="rope",
                      d_model=D, n_heads=H, d_ff=F, n_dec_layers=2, tgt_vocab_size=30, dropout=0.0)
    model = build_model(cfg).eval()
    ids = torch.randint(1, 30, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = torch.cat([model(ids[:, t:t + 1], cache) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # RMSNorm on q makes the logits blind to q's scale: the reading must show it (it read q before the norm before)
    before = attention_logits(attach(model), (ids,))["decoder"]["max"]
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.branch.projection_blocks()["q"].mul_(100.0)
    after = attention_logits(attach(model), (ids,))["decoder"]["max"]
    np.testing.assert_allclose(after, before, rtol=1e-4)


# ---- depth-scaled branches


def test_branch_multipliers_and_the_scaled_sublayer_equal_the_formula():
    assert branch_multiplier("depth_mup", 16) == 0.25 and branch_multiplier("completep", 16, 4) == 0.25
    assert branch_multiplier("none", 16) == 1.0
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, F, dropout=0.0, residual="pre_ln", branch_scale="completep", depths=(4, 4))
    randomize(layer)
    x = torch.randn(3, 5, D)
    f = _branch64(layer.ffn, "ffn")
    want = x.double() + 0.25 * f(_ln(layer.ffn.pre_norm, x.double()))  # m_L^-1 = 1/4
    torch.testing.assert_close(layer.ffn(x).double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="give depths"):
        EncoderLayer(D, H, F, residual="pre_ln", branch_scale="depth_mup")


@pytest.mark.parametrize("kind,lr_factor,eps_factor", [("depth_mup", 0.5, 0.5), ("completep", 1.0, 0.25)])
def test_depth_scaled_optimizer_groups_follow_completeps_table(tmp_path, kind, lr_factor, eps_factor):
    cfg = RunConfig.from_dict({"model": dict(arch="decoder_only", residual="pre_ln", d_model=D, n_heads=H, d_ff=F,
                                             n_dec_layers=4, tgt_vocab_size=30, branch_scale=kind),
                               "optim": {"lr": 1e-3, "eps": 1e-8, "warmup_updates": 0},
                               "train": {"out_dir": str(tmp_path), "max_updates": 1}})
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    set_lr(opt, 1, cfg)
    in_layers = {id(p) for p in model.layers.parameters()}
    for g in opt.param_groups:
        inside = {id(p) in in_layers for p in g["params"]}
        assert len(inside) == 1  # a group is all inside the residual blocks or all outside
        want = (lr_factor, eps_factor) if inside.pop() else (1.0, 1.0)
        assert math.isclose(g["lr"], 1e-3 * want[0]) and math.isclose(g["eps"], 1e-8 * want[1])
    assert len(param_groups(build_model(ModelConfig(arch="decoder_only", tgt_vocab_size=30)), 1e-8)) == 1


# ---- z-loss


def test_z_loss_adds_c_times_log_z_squared_per_target_token():
    torch.manual_seed(0)
    logits, target = 3 * torch.randn(2, 5, 11), torch.randint(1, 11, (2, 5))
    target[1, 3:] = 0  # padding
    loss0, nll0 = label_smoothed_nll_loss(logits, target, 0.1, 0)
    loss1, nll1 = label_smoothed_nll_loss(logits, target, 0.1, 0, z_loss=1e-2)
    log_z = torch.logsumexp(logits.double(), -1)[target.ne(0)]
    torch.testing.assert_close(nll0, nll1)  # the nll does not carry the z-loss
    assert math.isclose(loss1.item() - loss0.item(), 1e-2 * log_z.pow(2).sum().item(), rel_tol=1e-4)
    with pytest.raises(ConfigError, match="optim.z_loss"):
        RunConfig.from_dict({"optim": {"z_loss": -1e-4}})


# ---- every scheme x option, both models


def _tiny(arch, residual, **kw):
    torch.manual_seed(0)
    n = 2 if arch == "decoder_only" else 1
    cfg = dict(arch=arch, residual=residual, d_model=D, n_heads=H, d_ff=F, n_enc_layers=n, n_dec_layers=n,
               src_vocab_size=30, tgt_vocab_size=30, dropout=0.1, max_positions=32)
    return build_model(ModelConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("arch", ["decoder_only", "encoder_decoder"])
def test_every_scheme_and_option_trains_one_update_finite(arch):
    ids = torch.randint(1, 30, (4, 9))
    variants = [(s, o) for s in SCHEMES for o in OPTIONS] + [("mix_ln", {"mix_ln_fraction": 0.5}),
                                                              ("hybridnorm", {"hybridnorm_star": True})]
    for residual, option in variants:
        option = dict(option)
        z = option.pop("z_loss", 0.0)
        model = _tiny(arch, residual, **option)
        inputs = (ids[:, :-1],) if arch == "decoder_only" else (ids, ids[:, :-1])
        model.scheme.calibrate(model, *inputs, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss, _ = label_smoothed_nll_loss(model(*inputs), ids[:, 1:], 0.1, 0, z)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), (residual, option)
        assert all(torch.isfinite(p).all() for p in model.parameters()), (residual, option)


def test_the_analyses_return_results_for_every_scheme_on_the_decoder_only_model():
    ids = torch.randint(1, 30, (2, 8))
    for residual in SCHEMES:
        model = _tiny("decoder_only", residual, qk_norm=residual == "pre_ln")
        model.scheme.calibrate(model, ids, seed=0)
        sites = attach(model)
        results = [site_dependency(sites, (ids,))["decoder"], hidden_state_stats(sites, (ids,))["decoder"]["variance"],
                   angular_distances(sites, (ids,), gaps=[1])["decoder"]["distance"],
                   layer_removal(sites, (ids,))["decoder"]["delta"], attention_logits(sites, (ids,))["decoder"]["max"],
                   [log_partition(sites, (ids,))["mean"]]]
        assert all(np.isfinite(np.asarray(r, dtype=float)).all() for r in results), residual


@pytest.mark.parametrize("option", [{"branch_scale": "depth_mup"}, {"qk_norm": True}])
def test_to_hf_refuses_what_a_llama_checkpoint_cannot_hold(tmp_path, option):
    pytest.importorskip("transformers")
    from transformer_ln.interop.hf import to_hf

    model = build_model(ModelConfig(preset="llama", d_model=D, n_heads=H, d_ff=F, n_dec_layers=2, tgt_vocab_size=300,
                                    **option))
    with pytest.raises(ValueError, match=f"to_hf: model.{next(iter(option))}: got"):
        to_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_hybridnorm_v_norm_false_norms_only_queries_and_keys():
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, F, dropout=0.0, residual="hybridnorm", hybridnorm_v_norm=False, layer_index=1)
    att = layer.self_attn.branch
    assert isinstance(att.v_norm, nn.Identity) and not isinstance(att.q_norm, nn.Identity)
    randomize(layer)
    x = torch.randn(2, 5, D)
    y = _ln(layer.self_attn.post_norm, x.double() + _attn64(x.double(), att, norms=True))
    torch.testing.assert_close(layer(x).double(), y + _branch64(layer.ffn, "ffn")(y), atol=1e-5, rtol=1e-5)
