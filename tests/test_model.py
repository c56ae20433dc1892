"""Whole-model invariances: Admin(omega=1) == Post-LN, final norms, causality, padding, LayerNorm, caching."""
import torch
from torch import nn

from transformer_ln import SCHEMES, ModelConfig, Seq2SeqTransformer
from transformer_ln.model.schemes import OmegaResidual

from conftest import tiny_config, tiny_model


def batch(seed=0, B=3, S=7, T=6, V=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, V, (B, S), generator=g), torch.randint(4, V, (B, T), generator=g)


def test_logits_shape_and_parameter_names(any_scheme):
    model = tiny_model(any_scheme)
    src, tgt = batch()
    assert model(src, tgt).shape == (3, 6, 50)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("encoder.", "decoder.")) for n in names)


@torch.no_grad()
def test_admin_with_unit_omega_equals_post_ln_exactly():
    post, admin = tiny_model("post_ln"), tiny_model("admin", admin_omega="profile")
    missing, unexpected = admin.load_state_dict(post.state_dict(), strict=False)
    assert not unexpected and missing and all(k.endswith("residual.omega") for k in missing)
    assert all(torch.equal(m.omega, torch.ones_like(m.omega)) for m in admin.modules() if isinstance(m, OmegaResidual))
    src, tgt = batch()
    assert torch.equal(post.eval()(src, tgt), admin.eval()(src, tgt))


def test_a_final_norm_per_stack_exactly_where_the_scheme_declares_one(any_scheme):
    model = tiny_model(any_scheme)
    for stack in (model.encoder, model.decoder):
        assert isinstance(stack.final_norm, nn.LayerNorm) == SCHEMES[any_scheme].final_norm
    assert SCHEMES["pre_ln"].final_norm and not SCHEMES["post_ln"].final_norm and not SCHEMES["admin"].final_norm


@torch.no_grad()
def test_causality(any_scheme):
    model = tiny_model(any_scheme).eval()
    src, tgt = batch()
    base = model(src, tgt)
    for t in range(1, tgt.shape[1]):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 7) % 46 + 4
        out = model(src, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


@torch.no_grad()
def test_appending_source_padding_leaves_logits_unchanged(any_scheme):
    model = tiny_model(any_scheme).eval()
    src, tgt = batch()
    padded = torch.cat([src, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_layer_norm_is_batch_independent_and_mode_independent(any_scheme):
    model = tiny_model(any_scheme)  # dropout 0
    src, tgt = batch(B=4)
    model.eval()
    full = model(src, tgt)
    for i in range(4):
        torch.testing.assert_close(model(src[i:i + 1], tgt[i:i + 1]), full[i:i + 1], atol=1e-5, rtol=1e-5)
    model.train()
    torch.testing.assert_close(model(src, tgt), full, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_incremental_decoding_with_cache_matches_full_forward(any_scheme):
    model = tiny_model(any_scheme).eval()
    src, tgt = batch()
    src[1, 5:] = 0  # some source padding
    full = model(src, tgt)
    memory = model.encode(src)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t:t + 1], memory, src, cache) for t in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # a prefix of several tokens, then one at a time, and a reordered cache
    cache = model.new_cache()
    first = model.decode(tgt[:, :3], memory, src, cache)
    idx = torch.tensor([2, 0, 1])
    cache.reorder(idx)
    rest = model.decode(tgt[idx, 3:], memory[idx], src[idx], cache)
    torch.testing.assert_close(first, full[:, :3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest, full[idx, 3:], atol=1e-5, rtol=1e-5)


def test_tied_and_shared_embeddings_and_initialisation():
    cfg = tiny_config("post_ln", share_embeddings=True, d_model=64)
    torch.manual_seed(0)
    model = Seq2SeqTransformer(cfg)
    assert model.encoder.embed.embed_tokens.weight is model.decoder.embed.embed_tokens.weight
    emb = model.decoder.embed.embed_tokens.weight
    assert torch.all(emb[cfg.pad_id] == 0)
    assert abs(emb[1:].std().item() - 64 ** -0.5) < 0.01
    qkv = model.encoder.layers[0].self_attn.branch.qkv_proj.weight
    assert abs(qkv.var().item() - 1 / (2 * 64)) < 0.2 / (2 * 64)  # each q/k/v block: variance 1/(2d)
    untied = tiny_model("post_ln")
    assert untied.encoder.embed.embed_tokens.weight is not untied.decoder.embed.embed_tokens.weight


def test_unset_vocabulary_and_too_long_input_are_clear_errors():
    import pytest
    with pytest.raises(ValueError, match="src_vocab_size"):
        Seq2SeqTransformer(ModelConfig(d_model=32, n_heads=4))
    model = tiny_model("post_ln", max_positions=8)
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.ones(1, 9, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
