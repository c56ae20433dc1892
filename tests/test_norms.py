"""``model.norm``: each norm against its formula in float64, BatchNorm's batch and pad behaviour, the factory."""
import pytest
import torch
from torch import nn

from transformer_ln import ConfigError, ModelConfig, Seq2SeqTransformer
from transformer_ln.model.norms import NORMS, BatchNorm, DyT, RMSNorm, is_norm, make_norm

from conftest import tiny_config

D = 8


def _randomized(kind: str, seed: int = 0) -> nn.Module:
    norm = make_norm(kind, D).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in norm.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return norm


def _formula(kind: str, norm: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    g = norm.weight
    if kind == "layernorm":
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + 1e-5) * g + norm.bias
    if kind == "rmsnorm":
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * g
    if kind == "dyt":
        return g * torch.tanh(norm.alpha * x) + norm.bias
    rows = x[keep]  # batchnorm, training mode: statistics of the real tokens only
    mu = rows.mean(0)
    var = ((rows - mu) ** 2).mean(0)
    return (x - mu) / torch.sqrt(var + 1e-5) * g + norm.bias


@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_equals_its_formula_in_float64(kind):
    norm = _randomized(kind).train()
    x = 2.0 * torch.randn(3, 5, D, dtype=torch.float64) + 0.5
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 3:] = keep[2, 1:] = False
    got = norm(x, keep) if kind == "batchnorm" else norm(x)
    want = _formula(kind, norm, x, keep)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert is_norm(norm)


def test_dyt_alpha_is_one_learnable_scalar_from_one_half():
    n = DyT(D)
    assert n.alpha.shape == (1,) and n.alpha.item() == 0.5 and n.alpha.requires_grad


def test_batchnorm_ignores_pad_positions_and_tracks_running_averages():
    bn = BatchNorm(D).double().train()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 2:] = False
    y1 = bn(x, keep)
    x2 = x.clone()
    x2[1, 2:] = 1e3  # garbage at the pads
    y2 = BatchNorm(D).double().train()(x2, keep)
    torch.testing.assert_close(y1[keep], y2[keep], atol=0, rtol=0)
    rows = x[keep]
    torch.testing.assert_close(bn.running_mean, 0.1 * rows.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * rows.var(0, unbiased=True))
    bn.eval()  # eval: the running averages, per position independent of the batch
    want = (x - bn.running_mean) / torch.sqrt(bn.running_var + 1e-5) * bn.weight + bn.bias
    torch.testing.assert_close(bn(x), want)


def _model(norm: str) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(tiny_config("pre_ln", norm=norm, n_enc_layers=1, n_dec_layers=1))


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randint(1, 50, (4, 7), generator=g), torch.randint(1, 50, (4, 6), generator=g)
    src[2, 5:] = 0
    tgt[3, 4:] = 0
    return src, tgt


@pytest.mark.parametrize("norm", list(NORMS))
def test_only_batchnorm_depends_on_batch_mates_and_differs_between_train_and_eval(norm):
    model = _model(norm).train()  # dropout 0: train mode differs only through the norm
    src, tgt = _batch()
    with torch.no_grad():
        alone = model(src[:1], tgt[:1])
        together = model(src, tgt)[:1]
        trained = model(src, tgt)
        evaluated = model.eval()(src, tgt)
    batch_dependent = not torch.allclose(alone, together, atol=1e-5)
    mode_dependent = not torch.allclose(trained, evaluated, atol=1e-5)
    assert batch_dependent == mode_dependent == (norm == "batchnorm")


def test_batchnorm_model_ignores_padding_in_training():
    model = _model("batchnorm").train()
    src, tgt = _batch()
    longer_src = torch.cat([src, torch.zeros(4, 3, dtype=torch.long)], dim=1)  # more pad columns
    with torch.no_grad():
        a = model(src, tgt)
        b = model(longer_src, tgt)
    real = tgt.ne(0)
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_batchnorm_incremental_decoding_equals_full_forward_in_eval():
    model = _model("batchnorm").train()
    src, tgt = _batch()
    with torch.no_grad():
        model(src, tgt)  # running statistics move away from their initial values
        model.eval()
        memory = model.encode(src)
        full = model.decode(tgt, memory, src)
        cache = model.new_cache()
        steps = [model.decode(tgt[:, t:t + 1], memory, src, cache=cache) for t in range(tgt.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_norm_choice_builds_only_that_norm_and_is_validated():
    model = _model("rmsnorm")
    norms = [m for m in model.modules() if is_norm(m)]
    assert norms and all(isinstance(m, RMSNorm) for m in norms)
    with pytest.raises(ConfigError, match="model.norm"):
        ModelConfig(src_vocab_size=10, tgt_vocab_size=10, norm="groupnorm")
    cfg = ModelConfig.from_dict({k: v for k, v in tiny_config("admin", norm="dyt").to_dict().items()})
    assert cfg.norm == "dyt" and ModelConfig.from_yaml(cfg.to_yaml()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "norm"}  # a config written before model.norm existed
    assert ModelConfig.from_dict(old).norm == "layernorm"


@pytest.mark.parametrize("kind", list(NORMS))
def test_decompose_splits_the_output_exactly_into_the_input_components(kind):
    """sum_j decompose(parts)_j + shift == norm(sum_j parts_j), the shift independent of the split (beta's basis)."""
    norm = _randomized(kind, seed=3).eval()
    with torch.no_grad():
        if kind == "batchnorm":
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    parts = [torch.randn(2, 4, D, generator=g, dtype=torch.float64) for _ in range(3)]
    x = sum(parts)
    zero = torch.zeros_like(x)
    shift = norm(x) - sum(norm.decompose(parts, x))
    other_split = norm(x) - sum(norm.decompose([x - parts[0], parts[0], zero], x))
    torch.testing.assert_close(shift, other_split, atol=1e-12, rtol=0)
    if kind != "rmsnorm":  # RMSNorm has no bias: its shift is 0
        assert shift.abs().max() > 0
    else:
        torch.testing.assert_close(shift, zero, atol=1e-12, rtol=0)
