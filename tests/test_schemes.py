"""The schemes after Admin: each sub-layer against its formula in float64, their constants and initialisations,
structure (which norms exist), one Adam step and every analysis for every scheme x norm, configs and checkpoints."""
import math

import pytest
import torch
from torch import nn

from transformer_ln import ConfigError, DecoderLayer, EncoderLayer, ModelConfig, RunConfig, Seq2SeqTransformer
from transformer_ln.diagnostics import depth_sweep, gradient_norms, output_change, random_batch, residual_dependency
from transformer_ln.model.norms import NORMS, is_norm
from transformer_ln.model.schemes import SCHEMES, deepnorm_constants, get_scheme

from test_residual import ln64, randomize

D, H, F = 16, 4, 32
NEW = ("deepnorm", "subln", "rezero", "rezero_postln", "sandwich", "tfixup", "resi_dual")
COMBOS = [(s, n) for s in SCHEMES for n in NORMS if SCHEMES[s].has_norms or n == "layernorm"]


def _ln(n, x):
    return ln64(x, n.weight.double(), n.bias.double())


def _branch64(sub, kind):
    """The branch f (with Sub-LN's inner norm where the branch has one) in float64."""
    inner = sub.branch.inner_norm
    inner64 = (lambda t: t) if isinstance(inner, nn.Identity) else (lambda t: _ln(inner, t))
    if kind == "ffn":
        b = sub.branch
        return lambda t: inner64(torch.relu(t @ b.fc1.weight.double().T + b.fc1.bias.double())) \
            @ b.fc2.weight.double().T + b.fc2.bias.double()
    att = sub.branch
    return lambda t: inner64(_heads64(t, att)) @ att.out_proj.weight.double().T + att.out_proj.bias.double()


def _heads64(x, att):
    """Self-attention before its out_proj, in float64."""
    B, T, _ = x.shape
    q, k, v = (x @ att.qkv_proj.weight.double().T + att.qkv_proj.bias.double()).split(D, dim=-1)
    q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
    return (p @ v).transpose(1, 2).reshape(B, T, D)


def _expected(scheme, sub, x, f):
    if scheme == "deepnorm":
        return _ln(sub.post_norm, sub.residual.alpha * x + f(x))
    if scheme == "subln":
        return x + f(_ln(sub.pre_norm, x))
    if scheme == "rezero":
        return x + sub.residual.alpha.double() * f(x)
    if scheme == "rezero_postln":
        return _ln(sub.post_norm, x + sub.residual.alpha.double() * f(x))
    if scheme == "sandwich":
        return x + _ln(sub.branch_norm, f(_ln(sub.pre_norm, x)))
    if scheme == "tfixup":
        return x + f(x)
    raise AssertionError(scheme)


@pytest.mark.parametrize("kind", ["ffn", "self_attn"])
@pytest.mark.parametrize("scheme", NEW)
def test_new_sublayer_equals_its_formula_in_float64(scheme, kind):
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, F, dropout=0.0, residual=scheme, depths=(6, 6))
    randomize(layer)  # moves norm gains/biases and ReZero's alpha away from their init too
    sub = getattr(layer, kind)
    ctx = () if kind == "ffn" else (None,)
    x = torch.randn(3, 5, D)
    f = _branch64(sub, kind)
    if scheme == "resi_dual":
        d = torch.randn(3, 5, D)
        p_out, d_out = sub((x, d), *ctx)
        a = f(x.double())
        torch.testing.assert_close(p_out.double(), _ln(sub.post_norm, x.double() + a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(d_out.double(), d.double() + a, atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(sub(x, *ctx).double(), _expected(scheme, sub, x.double(), f), atol=1e-5, rtol=1e-5)


def test_resi_dual_stack_output_is_p_plus_norm_of_d():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=D, n_heads=H, d_ff=F,
                                           n_enc_layers=2, n_dec_layers=1, dropout=0.0, residual="resi_dual"))
    randomize(model)
    src = torch.randint(1, 20, (2, 5))
    with torch.no_grad():
        x0 = model.encoder.embed(src)
        stream = (x0, x0)
        for layer in model.encoder.layers:
            stream = layer(stream, model.key_mask(src))
        p, d = stream
        want = p.double() + _ln(model.encoder.final_norm, d.double())
        torch.testing.assert_close(model.encode(src).double(), want, atol=1e-5, rtol=1e-5)


def test_deepnorm_constants_equal_the_table():
    for n in (6, 18):  # N = M: (N^4 M)^(1/16) = N^(5/16)
        c = deepnorm_constants(n, n)
        want = {"encoder": (0.81 * n ** (5 / 16), 0.87 / n ** (5 / 16)),
                "decoder": ((3 * n) ** 0.25, 1 / (12 * n) ** 0.25)}
        for stack in want:
            assert c[stack][0] == pytest.approx(want[stack][0], abs=1e-9, rel=0)
            assert c[stack][1] == pytest.approx(want[stack][1], abs=1e-9, rel=0)
    with pytest.raises(ValueError, match="n_dec_layers"):
        deepnorm_constants(6, 0)


def test_deepnorm_shortcut_alpha_and_xavier_normal_beta_init_at_d512():
    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=10, tgt_vocab_size=10, d_model=512, n_heads=8, d_ff=2048, n_enc_layers=6,
                      n_dec_layers=6, residual="deepnorm")
    model = Seq2SeqTransformer(cfg)
    consts = deepnorm_constants(6, 6)
    d, d_ff = 512, 2048
    for stack in ("encoder", "decoder"):
        alpha, beta = consts[stack]
        layer = getattr(model, stack).layers[2]
        assert layer.ffn.residual.alpha == pytest.approx(alpha, abs=1e-12)
        attns = [layer.self_attn] + ([layer.cross_attn] if stack == "decoder" else [])
        for sub in attns:
            blocks = sub.branch.projection_blocks()
            for name, gain in (("q", 1.0), ("k", 1.0), ("v", beta), ("out", beta)):
                want = gain * math.sqrt(2 / (d + d))
                assert blocks[name].std().item() == pytest.approx(want, rel=0.01), (stack, name)
        for name in ("fc1", "fc2"):
            w = getattr(layer.ffn.branch, name).weight
            assert w.std().item() == pytest.approx(beta * math.sqrt(2 / (d + d_ff)), rel=0.01), (stack, name)
            assert w.mean().abs().item() < 3 * beta * math.sqrt(2 / (d + d_ff)) / math.sqrt(w.numel())


def test_tfixup_scales_its_init_on_construction_and_holds_no_norm():
    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=300, tgt_vocab_size=300, d_model=128, n_heads=4, d_ff=512, n_enc_layers=4,
                      n_dec_layers=2, residual="tfixup")
    model = Seq2SeqTransformer(cfg)
    d, d_ff, n, m = 128, 512, 4, 2
    xavier = lambda fan_in, fan_out: math.sqrt(2 / (fan_in + fan_out))  # noqa: E731  (xavier-uniform's std)
    enc, dec = model.encoder.layers[1], model.decoder.layers[1]
    s_enc, s_dec = 0.67 * n ** -0.25, (9 * m) ** -0.25
    checks = [(enc.ffn.branch.fc1.weight, s_enc * xavier(d, d_ff)),
              (enc.self_attn.branch.projection_blocks()["v"], s_enc * xavier(d, d)),  # sqrt(2) undid 1/sqrt(2)
              (enc.self_attn.branch.projection_blocks()["q"], xavier(d, d) / math.sqrt(2)),
              (dec.cross_attn.branch.projection_blocks()["out"], s_dec * xavier(d, d)),
              (dec.self_attn.branch.projection_blocks()["v"], s_dec * xavier(d, d)),
              (model.encoder.embed.embed_tokens.weight[1:], d ** -0.5 * (9 * n) ** -0.25)]
    for w, want in checks:
        assert w.std().item() == pytest.approx(want, rel=0.05)
    assert not any(is_norm(mod) for mod in model.modules())


@pytest.mark.parametrize("scheme", ["rezero", "tfixup"])
def test_rezero_and_tfixup_models_hold_no_normalization_module(scheme):
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=D, n_heads=H, d_ff=F,
                                           n_enc_layers=2, n_dec_layers=2, residual=scheme))
    kinds = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    assert not any(is_norm(m) or isinstance(m, kinds) for m in model.modules())
    with pytest.raises(ConfigError, match=scheme):
        ModelConfig(src_vocab_size=20, tgt_vocab_size=20, residual=scheme, norm="rmsnorm")
    with pytest.raises(ValueError, match=scheme):
        EncoderLayer(D, H, F, residual=scheme, norm="dyt")


def test_rezero_layers_are_the_identity_at_initialisation():
    torch.manual_seed(0)
    x, mem = torch.randn(2, 5, D), torch.randn(2, 4, D)
    enc = EncoderLayer(D, H, F, dropout=0.1, residual="rezero").train()
    dec = DecoderLayer(D, H, F, dropout=0.1, residual="rezero").train()
    assert all(m.alpha.item() == 0.0 for m in enc.modules() if hasattr(m, "alpha"))
    assert torch.equal(enc(x), x) and torch.equal(dec(x, mem), x)
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=D, n_heads=H, d_ff=F,
                                           n_enc_layers=3, n_dec_layers=2, residual="rezero")).eval()
    src = torch.randint(1, 20, (2, 6))
    assert torch.equal(model.encode(src), model.encoder.embed(src))


def test_subln_has_exactly_the_extra_norms_of_its_formula():
    enc = EncoderLayer(D, H, F, residual="subln", depths=(3, 2))  # Sub-LN's gamma needs the model's depths
    dec = DecoderLayer(D, H, F, residual="subln", depths=(3, 2))
    count = lambda mod: sum(is_norm(m) for m in mod.modules())  # noqa: E731
    assert count(enc) == 4  # pre-norm + inner norm in self-attention and in the FFN
    assert count(dec) == 5  # three pre-norms + inner norms in self-attention and FFN (none in cross-attention)
    assert isinstance(dec.cross_attn.branch.inner_norm, nn.Identity)
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=D, n_heads=H, d_ff=F,
                                           n_enc_layers=3, n_dec_layers=2, residual="subln"))
    assert count(model) == 3 * 4 + 2 * 5 + 2  # and one final norm per stack
    # gamma: the default init times sqrt(ln(3M) ln(2N)/3) (encoder), sqrt(ln(3M)) (decoder)
    torch.manual_seed(0)
    ref = Seq2SeqTransformer(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=D, n_heads=H, d_ff=F,
                                         n_enc_layers=3, n_dec_layers=2, residual="pre_ln"))
    torch.manual_seed(0)
    sub = Seq2SeqTransformer(ModelConfig(src_vocab_size=20, tgt_vocab_size=20, d_model=D, n_heads=H, d_ff=F,
                                         n_enc_layers=3, n_dec_layers=2, residual="subln"))
    g_enc, g_dec = math.sqrt(math.log(6) * math.log(6) / 3), math.sqrt(math.log(6))
    torch.testing.assert_close(sub.encoder.layers[0].ffn.branch.fc1.weight,
                               g_enc * ref.encoder.layers[0].ffn.branch.fc1.weight)
    torch.testing.assert_close(sub.decoder.layers[1].self_attn.branch.projection_blocks()["v"],
                               g_dec * ref.decoder.layers[1].self_attn.branch.projection_blocks()["v"])
    torch.testing.assert_close(sub.decoder.layers[1].self_attn.branch.projection_blocks()["q"],
                               ref.decoder.layers[1].self_attn.branch.projection_blocks()["q"])
    torch.testing.assert_close(sub.decoder.layers[1].cross_attn.branch.out_proj.weight,
                               ref.decoder.layers[1].cross_attn.branch.out_proj.weight)


def _tiny(scheme, norm, **kw):
    base = dict(src_vocab_size=23, tgt_vocab_size=23, d_model=D, n_heads=H, d_ff=F, n_enc_layers=2, n_dec_layers=2,
                dropout=0.1, residual=scheme, norm=norm, max_positions=32)
    base.update(kw)
    torch.manual_seed(0)
    return Seq2SeqTransformer(ModelConfig(**base))


def _adam_step(model, b):
    model.scheme.calibrate(model, b["src"], b["tgt_in"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    loss = nn.functional.cross_entropy(model(b["src"], b["tgt_in"]).flatten(0, 1), b["tgt_out"].flatten(),
                                       ignore_index=0)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(b["src"], b["tgt_in"])).all()


def test_one_adam_step_stays_finite_for_every_scheme_and_norm():
    b = random_batch(23, batch_size=4, seq_len=9, seed=1)
    for scheme, norm in COMBOS:
        _adam_step(_tiny(scheme, norm, n_enc_layers=1, n_dec_layers=1), b)


ANALYSED = [(s, "layernorm") for s in SCHEMES] + [("pre_ln", n) for n in NORMS if n != "layernorm"] + [
    ("deepnorm", "batchnorm"), ("resi_dual", "dyt")]


@pytest.mark.parametrize("scheme,norm", ANALYSED)
def test_every_analysis_runs_after_an_update(scheme, norm):
    model = _tiny(scheme, norm)
    b = random_batch(23, batch_size=4, seq_len=9, seed=1)
    _adam_step(model, b)
    beta = residual_dependency(model, b["src"], b["tgt_in"])
    for stack, n_sub in (("encoder", 4), ("decoder", 6)):
        assert beta[stack].shape == (n_sub, n_sub + 1)
        torch.testing.assert_close(torch.from_numpy((beta[stack] ** 2).sum(1)), torch.ones(n_sub, dtype=torch.float64))
    change = output_change(model, b["src"], b["tgt_in"], tgt_out=b["tgt_out"])
    assert all(math.isfinite(v) and v > 0 for v in change.values())
    grads = gradient_norms(model, b["src"], b["tgt_in"], b["tgt_out"])
    assert len(grads) == 10 and all(math.isfinite(r["output_grad_norm"]) and r["output_grad_norm"] > 0
                                    for r in grads.values())


def test_rezero_dependency_is_exact_without_norms():
    """No norms: x_i is exactly x_0 + sum_j alpha_j a_j, so beta at alpha = 0 puts everything on x_0."""
    model = _tiny("rezero", "layernorm", dropout=0.0)
    b = random_batch(23, batch_size=3, seq_len=7, seed=2)
    beta = residual_dependency(model, b["src"], b["tgt_in"])["encoder"]
    assert (beta[:, 0] == 1.0).all() and (beta[:, 1:] == 0.0).all()


def test_depth_sweep_covers_every_scheme():
    sweep = depth_sweep(depths=(1, 2), d_model=16, n_heads=2, vocab_size=30, batch_size=2, seq_len=6,
                        progress=False)
    assert list(sweep["results"]) == list(SCHEMES)
    assert all(len(r["output_change"]) == 2 and all(v > 0 for v in r["output_change"])
               for r in sweep["results"].values())


@pytest.mark.parametrize("scheme,norm", [("deepnorm", "rmsnorm"), ("resi_dual", "batchnorm"),
                                         ("admin", "dyt"), ("tfixup", "layernorm")])
def test_config_and_checkpoint_round_trip(tmp_path, scheme, norm):
    from transformer_ln.runs.checkpoint import load_model, save_checkpoint

    model = _tiny(scheme, norm, admin_omega="O(logn)")
    b = random_batch(23, batch_size=3, seq_len=6, seed=3)
    model.train()
    with torch.no_grad():
        model(b["src"], b["tgt_in"])  # BatchNorm's running statistics move
    cfg = RunConfig.from_dict({"model": model.cfg.to_dict()})
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    save_checkpoint(tmp_path, 1, model, torch.optim.Adam(model.parameters()).state_dict(), cfg, {"update": 1})
    loaded, loaded_cfg = load_model(tmp_path, "last")
    assert loaded_cfg.model.residual == scheme and loaded_cfg.model.norm == norm
    with torch.no_grad():
        torch.testing.assert_close(loaded(b["src"], b["tgt_in"]), model.eval()(b["src"], b["tgt_in"]))


def test_checkpoint_written_before_model_norm_still_loads(tmp_path):
    import yaml

    from transformer_ln.runs.checkpoint import load_model, save_checkpoint

    model = _tiny("pre_ln", "layernorm").eval()
    cfg = RunConfig.from_dict({"model": model.cfg.to_dict()})
    ckpt = save_checkpoint(tmp_path, 1, model, torch.optim.Adam(model.parameters()).state_dict(), cfg, {"update": 1})
    data = yaml.safe_load((ckpt / "config.yaml").read_text())
    del data["model"]["norm"]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(data))
    loaded, loaded_cfg = load_model(tmp_path, "last")
    assert loaded_cfg.model.norm == "layernorm"
    src = torch.randint(1, 23, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(src, src), model(src, src))


def test_scheme_registry_carries_labels_colours_and_rejects_unknown_names():
    from transformer_ln.diagnostics.plotting import SCHEME_COLORS, SCHEME_LABELS

    assert set(NEW) < set(SCHEMES) and len(set(SCHEME_COLORS.values())) == len(SCHEMES)
    assert all(SCHEME_LABELS[s] == SCHEMES[s].label for s in SCHEMES)
    with pytest.raises(ValueError, match="allowed"):
        get_scheme("fixup")
    with pytest.raises(ValueError, match="unknown scheme option"):
        get_scheme("deepnorm", alpha=2.0)


def test_analyze_cli_takes_any_scheme_and_norm(tmp_path):
    from transformer_ln.diagnostics.cli import main as analyze

    tiny = ["model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_enc_layers=1", "model.n_dec_layers=1"]
    assert analyze(["dependency", "--out", str(tmp_path), *tiny, "model.norm=batchnorm",
                    "--residuals", "resi_dual,deepnorm,subln"]) == 0
    import json

    data = json.loads((tmp_path / "dependency.json").read_text())
    assert list(data["results"]) == ["resi_dual", "deepnorm", "subln"]
    assert (tmp_path / "dependency.png").stat().st_size > 1000


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_residual_hook_sees_exactly_the_summed_terms(scheme):
    """The contract analysis relies on: the combiner's output is s * shortcut + b * branch with its exposed scales,
    and its branch input is what the branch slots produced (Sandwich's LN_out and Sub-LN's inner norms included)."""
    from transformer_ln.diagnostics.hooks import registered_hooks, sublayers

    model = _tiny(scheme, "layernorm", dropout=0.0)
    randomize(model, seed=4)  # ReZero's alpha and Admin's omega away from 0 and 1
    seen = []
    with registered_hooks() as hooks:
        for stack in sublayers(model).values():
            for _, sub in stack:
                record = {}
                hooks.forward(sub.residual,
                              lambda m, i, o, r=record: r.update(x=i[0], a=i[1], out=o, scales=m.scales()))
                hooks.forward(sub.dropout, lambda m, i, o, r=record: r.update(branch=o))
                seen.append(record)
        b = random_batch(23, batch_size=2, seq_len=6, seed=5)
        with torch.no_grad():
            model.eval()(b["src"], b["tgt_in"])
    assert len(seen) == 10
    for r in seen:
        s, g = (1.0 if v is None else v for v in r["scales"])
        torch.testing.assert_close(r["out"], s * r["x"] + g * r["a"], atol=1e-6, rtol=1e-6)
        assert torch.equal(r["a"], r["branch"])


# ---------------------------------------------------------------------------------------------------------------
# a new scheme with an option of its own touches only the schemes module (here: this test) and trains from the CLI


def test_a_registered_scheme_with_an_option_trains_through_the_cli(tmp_path, monkeypatch, capsys):
    import json

    from transformer_ln.cli import main as cli_main
    from transformer_ln.diagnostics.plotting import curves_figure
    from transformer_ln.model.schemes import PostLN, ScaledResidual, SchemeOption
    from transformer_ln.runs.checkpoint import load_model

    class GainPostLN(PostLN):
        """Post-LN with a constant shortcut gain: x_i = LN(gain * x_{i-1} + a_i) (a throwaway for this test)."""

        name, label, color = "gain_post_ln", "Gain Post-LN", "tab:gray"
        options = {"shortcut_gain": SchemeOption(1.0, "the shortcut's constant gain")}
        curve_panels = (("gain", "shortcut gain", None),)

        def residual(self, site):
            return ScaledResidual(self.shortcut_gain)

        def update_stats(self, model):
            return {"gain": torch.tensor(self.shortcut_gain)}

    monkeypatch.setitem(SCHEMES, GainPostLN.name, GainPostLN)
    tiny = ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_enc_layers=1", "model.n_dec_layers=1",
            "model.max_positions=128", "data.synthetic_size=200", "data.vocab_size=200", "train.max_tokens=600",
            "train.max_updates=1", "train.bleu_at_end=false", "model.residual=gain_post_ln"]
    run = tmp_path / "run"
    assert cli_main(["train", "--cpu", *tiny, "model.shortcut_gain=0.5", f"train.out_dir={run}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["gain"] for r in records if r["kind"] == "train"] == [0.5]  # the scheme's own telemetry
    model, cfg = load_model(run, "last")
    assert cfg.model.shortcut_gain == 0.5 and "shortcut_gain: 0.5" in (run / "config.yaml").read_text()
    alphas = {m.alpha for m in model.modules() if isinstance(m, ScaledResidual)}
    assert alphas == {0.5}
    fig = curves_figure([run])
    assert any(ax.get_title() == "shortcut gain" for ax in fig.axes)
    capsys.readouterr()
    assert cli_main(["train", "--cpu", *tiny, "model.shortcut_gain=nan", f"train.out_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.shortcut_gain" in err[0] and "NaN" in err[0]
