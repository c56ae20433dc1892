"""Diagnostics on the decoder-only ``CausalLM``: the same hooks and functions as the encoder-decoder, called with
the ids alone, checked against independent computations (plain forward hooks, a hand-perturbed copy, autograd),
and the ``analyze`` command line on fresh decoder-only models and on a decoder-only run directory."""
from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transformer_ln import SCHEMES, ModelConfig, UserError, build_model
from transformer_ln.diagnostics import (GradNormCallback, batch_inputs, depth_sweep, gradient_norms, output_change,
                                        perturbed_names, random_batch_for, random_blocks, residual_components,
                                        residual_dependency)
from transformer_ln.diagnostics import build_model as build_calibrated
from transformer_ln.diagnostics.cli import main as analyze
from transformer_ln.diagnostics.hooks import sublayers
from transformer_ln.diagnostics.plotting import dependency_figure, grad_norms_figure, output_change_figure

V, M = 40, 3  # vocabulary, decoder layers (2 M sub-layers)


def lm(residual: str = "pre_ln", seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = dict(arch="decoder_only", residual=residual, d_model=16, n_heads=2, d_ff=32, n_dec_layers=M,
               tgt_vocab_size=V, dropout=0.1, max_positions=32)
    return build_model(ModelConfig(**{**cfg, **kw}))


def randomize(model, seed: int = 1):
    """Norm gains and shifts, biases and combiner scales away from their init: a shift that is dropped shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if "omega" in name or name.endswith("alpha"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
    return model


def ids(batch_size: int = 3, seq_len: int = 10, seed: int = 2) -> torch.Tensor:
    return random_blocks(V, batch_size, seq_len, seed=seed)["input"]


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())


def _outputs(model, x: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Every sub-layer's output and its post-norm's input, captured by plain forward hooks on an eval forward."""
    outs, norm_in, handles = [], {}, []
    for name, sub in sublayers(model)["decoder"]:
        handles.append(sub.register_forward_hook(lambda m, i, o: outs.append(o)))
        handles.append(sub.post_norm.register_forward_hook(lambda m, i, o, n=name: norm_in.__setitem__(n, i[0])))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return outs, norm_in


# ---------------------------------------------------------------------------------------------------------------
# dependency


@pytest.mark.parametrize("residual", list(SCHEMES))
def test_lm_beta_has_only_the_decoder_rows_of_unit_norm_and_zeros_right_of_the_diagonal(residual):
    model = randomize(lm(residual))
    beta = residual_dependency(model, ids())
    assert list(beta) == ["decoder"] and beta["decoder"].shape == (2 * M, 2 * M + 1)
    b = beta["decoder"]
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-12)
    assert np.all(b[np.triu_indices(2 * M, k=2, m=2 * M + 1)] == 0)
    assert np.all(np.isfinite(b)) and np.all(b >= 0)
    assert [n for n, _ in sublayers(model)["decoder"]] == [f"layers.{i // 2}.{'ffn' if i % 2 else 'self_attn'}"
                                                           for i in range(2 * M)]
    assert _no_hooks(model)


def test_pre_ln_components_sum_exactly_to_the_stream_and_are_x0_and_the_branches():
    model = randomize(lm("pre_ln")).double()
    x = ids()
    comps = residual_components(model, x)["decoder"]
    outs, _ = _outputs(model, x)
    branches, handles = [], [sub.dropout.register_forward_hook(lambda m, i, o: branches.append(o))
                             for _, sub in sublayers(model)["decoder"]]
    x0 = []
    handles.append(model.embed.register_forward_hook(lambda m, i, o: x0.append(o)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert len(comps) == len(outs) == 2 * M
    for i, (c, out) in enumerate(zip(comps, outs)):
        assert c.shape == (i + 2, *out.shape) and c.dtype == torch.float64
        torch.testing.assert_close(c.sum(0), out, rtol=0, atol=1e-10)  # the decomposition is exact
        torch.testing.assert_close(c[0], x0[0], rtol=0, atol=0)  # a plain shortcut keeps x_0 as it is
        for j in range(1, i + 2):
            torch.testing.assert_close(c[j], branches[j - 1], rtol=0, atol=0)
    # a check that can fail: dropping any one component breaks the sum
    assert (comps[-1][:-1].sum(0) - outs[-1]).abs().max() > 1e-3


def test_post_ln_components_plus_the_propagated_norm_shift_equal_the_stream():
    """Post-LN's components leave out LayerNorm's shift; recomputed by hand (h_i = g (h - mean h) / sigma_i + b,
    sigma_i from the norm's own input captured by a plain hook), components plus shift are x_i exactly."""
    model = randomize(lm("post_ln")).double()
    x = ids()
    comps = residual_components(model, x)["decoder"]
    outs, norm_in = _outputs(model, x)
    shift = torch.zeros_like(outs[0])
    for (name, sub), c, out in zip(sublayers(model)["decoder"], comps, outs):
        z = norm_in[name]
        sigma = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + sub.post_norm.eps)
        shift = sub.post_norm.weight * (shift - shift.mean(-1, keepdim=True)) / sigma + sub.post_norm.bias
        torch.testing.assert_close(c.sum(0) + shift, out, rtol=0, atol=1e-10)
    assert (comps[-1].sum(0) - outs[-1]).abs().max() > 1e-2  # the shift is not negligible: the check can fail


# ---------------------------------------------------------------------------------------------------------------
# output change


def test_lm_output_change_is_zero_at_eps_0_and_leaves_the_model_alone():
    model = randomize(lm("admin"))
    model.train()
    model.layers[0].ffn.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids()
    assert output_change(model, x, eps=0.0) == {"decoder": 0.0}
    for kw in ({"eps": 1e-2, "n_samples": 2}, {"perturbation": "grad_sign"}, {"preset": "reference",
                                                                             "stacks": ("decoder",)}):
        change = output_change(model, x, **kw)
        assert list(change) == ["decoder"] and math.isfinite(change["decoder"]) and change["decoder"] > 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.training and not model.layers[0].ffn.training and _no_hooks(model)
    with pytest.raises(ValueError, match=r"stacks=\('decoder',\)"):  # the reference preset names the encoder
        output_change(model, x, preset="reference")


@pytest.mark.parametrize("residual, tie", [("pre_ln", True), ("post_ln", False)])
def test_lm_output_change_equals_a_hand_perturbed_copy(residual, tie):
    model = randomize(lm(residual, tie_embeddings=tie)).double().eval()
    x, eps, seed = ids(), 1e-3, 7
    # the weights that move, by hand: not biases, not norm parameters (pre/post/final norms), not combiner scales
    want_names = [n for n, _ in model.named_parameters()
                  if not n.endswith("bias") and "norm" not in n and ".residual." not in n]
    assert perturbed_names(model) == want_names
    assert ("lm_head.weight" in want_names) == (not tie) and "embed.embed_tokens.weight" in want_names
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        base = model.hidden(x)
        for _ in range(2):
            moved = copy.deepcopy(model)
            params = dict(moved.named_parameters())
            for n in want_names:
                params[n].add_(torch.randn(params[n].shape, generator=g).sign().double(), alpha=eps)
            total += (moved.hidden(x) - base).pow(2).sum().item()
    got = output_change(model, x, eps=eps, n_samples=2, seed=seed)
    assert got["decoder"] == pytest.approx(total / 2, rel=1e-9) and total > 0


# ---------------------------------------------------------------------------------------------------------------
# gradient norms


@pytest.mark.parametrize("residual", ["post_ln", "pre_ln", "resi_dual"])
def test_lm_gradient_norms_equal_autograd_per_sublayer(residual):
    model = randomize(lm(residual)).double().eval()
    x = ids()
    target = random_blocks(V, 3, 10, seed=9)["target"]
    got_next = gradient_norms(model, x)
    got_target = gradient_norms(model, x, tgt_out=target)
    assert all(p.grad is None for p in model.parameters()) and _no_hooks(model)
    names = [n for n, _ in sublayers(model)["decoder"]]
    assert list(got_next) == names
    assert [(r["stack"], r["index"]) for r in got_next.values()] == [("decoder", i + 1) for i in range(2 * M)]
    for got, loss_of in ((got_next, lambda lo: F.cross_entropy(lo[:, :-1].flatten(0, 1), x[:, 1:].flatten())),
                         (got_target, lambda lo: F.cross_entropy(lo.flatten(0, 1), target.flatten()))):
        model.zero_grad(set_to_none=True)
        outs = []

        def keep_grad(m, i, o):
            for t in (o if isinstance(o, tuple) else (o,)):
                t.retain_grad()
            outs.append(o if isinstance(o, tuple) else (o,))
        handles = [model.get_submodule(n).register_forward_hook(keep_grad) for n in names]
        loss_of(model(x)).backward()
        for h in handles:
            h.remove()
        for name, o in zip(names, outs):
            want_out = math.sqrt(sum(t.grad.pow(2).sum().item() for t in o if t.grad is not None))
            want_par = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.get_submodule(name).parameters()
                                     if p.grad is not None))
            assert got[name]["output_grad_norm"] == pytest.approx(want_out, rel=1e-9), name
            assert got[name]["param_grad_norm"] == pytest.approx(want_par, rel=1e-9), name
        assert max(r["output_grad_rel"] for r in got.values()) == pytest.approx(1.0)
    model.zero_grad(set_to_none=True)


def test_grad_norm_callback_reads_a_language_model_batch():
    model, logged = lm("pre_ln"), []
    batch = random_blocks(V, 2, 6, seed=3)
    GradNormCallback(every=1).on_update_end(SimpleNamespace(update=1, model=model, batch=batch, log=logged.append))
    (x,), target = batch_inputs(batch)
    assert logged[0]["sublayers"] == gradient_norms(model, x, tgt_out=target)
    json.dumps(logged)


# ---------------------------------------------------------------------------------------------------------------
# depth sweep and figures


def test_depth_sweep_of_a_decoder_only_model_measures_its_decoder():
    kw = dict(d_model=16, n_heads=2, vocab_size=30, batch_size=2, seq_len=6, progress=False, arch="decoder_only")
    sweep = depth_sweep(["pre_ln", "post_ln"], depths=(1, 2, 3), **kw)
    assert sweep["config"]["stack"] == "decoder" and sweep["definition"]["stacks"] == ["decoder"]
    assert sweep["config"]["n_tokens"] == 12  # packed blocks: every position is real
    for r in ("pre_ln", "post_ln"):
        res = sweep["results"][r]
        assert res["sublayers"] == [2, 4, 6] and all(math.isfinite(v) and v > 0 for v in res["output_change"])
    # the depth-2 Pre-LN value is output_change on that model, built and calibrated as the sweep builds it
    batch = random_batch_for(lm("pre_ln", tgt_vocab_size=30, src_vocab_size=30), 2, 6, seed=0)
    model = build_calibrated("pre_ln", 1, 16, 2, None, 30, n_dec_layers=2, seed=0, batch=batch, arch="decoder_only")
    assert len(sublayers(model)["decoder"]) == 4 and "encoder" not in sublayers(model)
    assert output_change(model, batch["input"], seed=0)["decoder"] == sweep["results"]["pre_ln"]["output_change"][1]
    fig = output_change_figure(sweep)
    assert fig.axes[0].get_xlabel() == "decoder sub-layers N (2 per layer)"
    assert fig._suptitle.get_text().startswith("Decoder output change")


def test_figures_of_a_decoder_only_model_have_only_decoder_panels():
    model = lm("pre_ln")
    x = ids()
    dep = dependency_figure({"pre_ln": residual_dependency(model, x)})
    assert [ax.get_title() for ax in dep.axes if ax.images] == ["Pre-LN decoder (init)"]
    fig = grad_norms_figure({"pre_ln": gradient_norms(model, x)}, "best")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["decoder: gradient at sub-layer outputs (best)", "decoder: gradient at sub-layer parameters (best)"]
    assert all(len(ax.get_lines()) == 1 and len(ax.get_lines()[0].get_xdata()) == 2 * M for ax in fig.axes)


# ---------------------------------------------------------------------------------------------------------------
# command line

TINY = ["model.arch=decoder_only", "model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_dec_layers=2",
        "--vocab", "40", "--batch-size", "2", "--seq-len", "8"]


def _png_ok(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command, stem, extra", [
    ("dependency", "dependency", ["--residuals", "post_ln,admin"]),
    ("output-change", "output_change", ["--residuals", "pre_ln", "--preset", "reference"]),
    ("output-change", "output_change", ["--depths", "1,2", "model.residual=pre_ln"]),
    ("gradients", "grad_norms", ["model.residual=post_ln"]),
])
def test_cli_on_decoder_only_models_writes_json_figures_and_decoder_tables(tmp_path, command, stem, extra, capsys):
    assert analyze([command, "--out", str(tmp_path), *TINY, *extra]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert _png_ok(tmp_path / f"{stem}.png") and (tmp_path / f"{stem}.pdf").stat().st_size > 0
    assert str(tmp_path / f"{stem}.json") in out and "encoder" not in out.replace("measures the encoder", "")
    if "--depths" in extra:
        assert data["config"]["stack"] == "decoder" and data["results"]["pre_ln"]["sublayers"] == [2, 4]
        return
    for scheme, r in data["results"].items():
        stacks = {e["stack"] for e in r.values()} if command == "gradients" else set(r)
        assert stacks == {"decoder"}, scheme
        assert f"{scheme}  " in out or f"{scheme} " in out
    if command == "output-change":
        assert data["definition"]["stacks"] == ["decoder"] and "note:" in out  # the reference's encoder -> decoder


def _lm_run(path, residual="pre_ln"):
    """A run directory as the trainer leaves it (a checkpoint of a decoder-only model, its config, metrics)."""
    from transformer_ln.config import RunConfig
    from transformer_ln.runs.checkpoint import save_checkpoint

    cfg = RunConfig.from_dict({"model": {"arch": "decoder_only", "residual": residual, "d_model": 16, "n_heads": 2,
                                         "d_ff": 32, "n_dec_layers": 2, "tgt_vocab_size": V, "max_positions": 12},
                               "train": {"out_dir": str(path), "max_updates": 3}})
    model = randomize(build_model(cfg.model), seed=5)
    save_checkpoint(path, 3, model, {}, cfg, {"update": 3})
    recs = [{"kind": "train", "update": u, "loss": 6.0 - u, "nll": 6.0 - u, "lr": 1e-3, "grad_norm": 1.0}
            for u in (1, 2, 3)] + [{"kind": "valid", "update": 3, "loss": 3.5, "nll": 3.5, "ppl": 11.3}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (path / "summary.json").write_text(json.dumps({"status": "completed", "updates": 3, "best_valid_loss": 3.5,
                                                   "arch": "decoder_only"}))
    return model


def test_cli_run_directory_of_a_language_model(tmp_path, capsys):
    from transformer_ln.runs.checkpoint import load_model

    run = tmp_path / "lm"
    saved = _lm_run(run)
    with pytest.raises(UserError, match="max_positions"):  # --seq-len 20 (the default) does not fit 12 positions
        analyze(["dependency", "--run", str(run), "--random-ids", "--out", str(tmp_path / "o")])
    for command in ("dependency", "gradients"):
        assert analyze([command, "--run", str(run), "--random-ids", "--seq-len", "8", "--out",
                        str(tmp_path / "o")]) == 0
    assert analyze(["curves", str(run), "--out", str(tmp_path / "o")]) == 0
    dep = json.loads((tmp_path / "o" / "dependency.json").read_text())
    assert dep["checkpoint"] == "lm:best" and list(dep["results"]) == ["pre_ln"]
    assert list(dep["results"]["pre_ln"]) == ["decoder"]
    model, _ = load_model(run)  # the numbers are the checkpoint's, on seeded random blocks
    for a, b in zip(model.state_dict().values(), saved.state_dict().values()):
        assert torch.equal(a, b)
    x = random_blocks(V, 4, 8, seed=0)
    beta = residual_dependency(model, x["input"])["decoder"]
    np.testing.assert_allclose(dep["results"]["pre_ln"]["decoder"]["beta"], beta, rtol=1e-6, atol=1e-9)
    grads = json.loads((tmp_path / "o" / "grad_norms.json").read_text())["results"]["pre_ln"]
    want = gradient_norms(model, x["input"], tgt_out=x["target"])
    assert [g["output_grad_norm"] for g in grads.values()] == pytest.approx(
        [w["output_grad_norm"] for w in want.values()], rel=1e-6)
    curves = json.loads((tmp_path / "o" / "curves.json").read_text())["runs"][0]
    assert curves["n_train"] == 3 and curves["n_valid"] == 1 and curves["last_train_loss"] == 3.0
    assert all(_png_ok(tmp_path / "o" / f"{s}.png") for s in ("dependency", "grad_norms", "curves"))


def test_no_hooks_remain_when_an_lm_diagnostic_raises():
    model = lm("post_ln")
    too_long = torch.ones(2, 40, dtype=torch.long)  # longer than max_positions=32
    model.train()
    for call in (lambda: residual_dependency(model, too_long), lambda: output_change(model, too_long),
                 lambda: gradient_norms(model, too_long)):
        with pytest.raises((ValueError, IndexError, RuntimeError)):
            call()
        assert _no_hooks(model) and model.training
