"""Diagnostics: exact values against an independent float64 re-implementation, invariants, hook hygiene, the
paper's trends at initialisation, and the ``analyze`` command line."""
from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transformer_ln import ModelConfig, Seq2SeqTransformer, UserError
from transformer_ln.diagnostics import (GradNormCallback, build_model, depth_sweep, fit, gradient_norms,
                                        output_change, random_batch, residual_dependency)
from transformer_ln.diagnostics.cli import main as analyze
from transformer_ln.diagnostics.output_change import definition as output_definition

SCHEMES = ("post_ln", "pre_ln", "admin")
D, H, V = 8, 2, 13


# ---------------------------------------------------------------------------------------------------------------
# a hand-built 1-layer model (2 encoder and 3 decoder sub-layers) and its float64 re-implementation


def hand_model(residual: str, seed: int = 0) -> Seq2SeqTransformer:
    """Tiny model with every LayerNorm gain/bias, bias and omega moved away from its init (a stronger test)."""
    torch.manual_seed(seed)
    cfg = ModelConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=D, n_heads=H, d_ff=16, n_enc_layers=1,
                      n_dec_layers=1, dropout=0.0, residual=residual, admin_omega="profile", max_positions=16)
    model = Seq2SeqTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
            if "omega" in name:
                p.copy_(1.0 + torch.rand_like(p))
    return model.double().eval()


def _ln(b, P, prefix):
    sigma = torch.sqrt(b.var(-1, unbiased=False, keepdim=True) + 1e-5)
    return (b - b.mean(-1, keepdim=True)) / sigma * P[prefix + ".weight"] + P[prefix + ".bias"], sigma


def _mha(xq, xkv, wq, bq, wk, bk, wv, bv, wo, bo, allowed):
    B, T, _ = xq.shape
    S, dh = xkv.shape[1], D // H

    def heads(x, n):
        return x.view(B, n, H, dh).transpose(1, 2)
    q, k, v = heads(xq @ wq.T + bq, T), heads(xkv @ wk.T + bk, S), heads(xkv @ wv.T + bv, S)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~allowed, -math.inf)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D) @ wo.T + bo


def _self_attn(x, P, p, allowed):
    w, b = P[p + "qkv_proj.weight"].split(D), P[p + "qkv_proj.bias"].split(D)
    return _mha(x, x, w[0], b[0], w[1], b[1], w[2], b[2], P[p + "out_proj.weight"], P[p + "out_proj.bias"], allowed)


def _cross_attn(x, mem, P, p, allowed):
    wk, wv = P[p + "kv_proj.weight"].split(D)
    bk, bv = P[p + "kv_proj.bias"].split(D)
    return _mha(x, mem, P[p + "q_proj.weight"], P[p + "q_proj.bias"], wk, bk, wv, bv, P[p + "out_proj.weight"],
                P[p + "out_proj.bias"], allowed)


def _ffn(x, P, p):
    return torch.relu(x @ P[p + "fc1.weight"].T + P[p + "fc1.bias"]) @ P[p + "fc2.weight"].T + P[p + "fc2.bias"]


def hand_forward(P: dict, residual: str, src, tgt_in, positions):
    """Float64 forward from a parameter dict: stack outputs, logits and each sub-layer's (x, a, sigma, name, out)."""
    records = {"encoder": [], "decoder": []}

    def sub(stack, prefix, x, branch):
        inp = _ln(x, P, prefix + ".pre_norm")[0] if residual == "pre_ln" else x
        a = branch(inp)
        if residual == "pre_ln":
            records[stack].append((x, a, None, prefix, x + a))
            return x + a
        shortcut = x * P[prefix + ".residual.omega"] if residual == "admin" else x
        out, sigma = _ln(shortcut + a, P, prefix + ".post_norm")
        records[stack].append((x, a, sigma, prefix, out))
        return out

    T_s, T_t = src.shape[1], tgt_in.shape[1]
    src_keys = src.ne(0)[:, None, None, :]
    x = P["encoder.embed.embed_tokens.weight"][src] * math.sqrt(D) + positions[:T_s]
    e = "encoder.layers.0"
    x = sub("encoder", e + ".self_attn", x, lambda h: _self_attn(h, P, e + ".self_attn.branch.", src_keys))
    x = sub("encoder", e + ".ffn", x, lambda h: _ffn(h, P, e + ".ffn.branch."))
    enc = _ln(x, P, "encoder.final_norm")[0] if residual == "pre_ln" else x
    E_t = P["decoder.embed.embed_tokens.weight"]
    y = E_t[tgt_in] * math.sqrt(D) + positions[:T_t]
    d = "decoder.layers.0"
    causal = torch.ones(T_t, T_t, dtype=torch.bool).tril()
    y = sub("decoder", d + ".self_attn", y, lambda h: _self_attn(h, P, d + ".self_attn.branch.", causal))
    y = sub("decoder", d + ".cross_attn", y, lambda h: _cross_attn(h, enc, P, d + ".cross_attn.branch.", src_keys))
    y = sub("decoder", d + ".ffn", y, lambda h: _ffn(h, P, d + ".ffn.branch."))
    dec = _ln(y, P, "decoder.final_norm")[0] if residual == "pre_ln" else y
    return {"encoder": enc, "decoder": dec, "logits": dec @ E_t.T, "records": records}


def hand_beta(records, P, residual, keep) -> np.ndarray:
    """beta from the closed form: component j in x_i is L_i(w_i L_{i-1}(... w_{j+1} L_j(a_j))), with
    L_k(v) = gamma_k (v - mean v) / sigma_k and w_k = omega_k for Admin (identity maps for Pre-LN).

    Also checks that the components plus the propagated LayerNorm shifts rebuild each x_i exactly.
    """
    n = len(records)
    s = np.zeros((n, n + 1))

    def L(k, v):  # k is 1-based
        _, _, sigma, prefix, _ = records[k - 1]
        return (v - v.mean(-1, keepdim=True)) / sigma * P[prefix + ".post_norm.weight"]

    def w(k, v):
        return v * P[records[k - 1][3] + ".residual.omega"] if residual == "admin" else v

    for i in range(1, n + 1):
        parts, shift = [], torch.zeros(())
        for j in range(0, i + 1):
            c = records[0][0] if j == 0 else records[j - 1][1]
            if residual != "pre_ln":
                if j >= 1:
                    c = L(j, c)
                for k in range(j + 1, i + 1):
                    c = L(k, w(k, c))
            parts.append(c)
            s[i - 1, j] = c.std(-1, unbiased=False)[keep].mean().item()
        if residual != "pre_ln":
            for k in range(1, i + 1):
                shift = L(k, w(k, shift)) + P[records[k - 1][3] + ".post_norm.bias"]
        torch.testing.assert_close(sum(parts) + shift, records[i - 1][4], rtol=1e-10, atol=1e-10)
    return s / np.sqrt((s ** 2).sum(1, keepdims=True))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _batch():
    return random_batch(V, batch_size=3, seq_len=6, seed=1)


@pytest.mark.parametrize("residual", SCHEMES)
def test_beta_matches_float64_hand_computation(residual):
    model, b = hand_model(residual), _batch()
    P = _params(model)
    ref = hand_forward(P, residual, b["src"], b["tgt_in"], model.encoder.embed.positions.double())
    got = residual_dependency(model, b["src"], b["tgt_in"])
    keep = {"encoder": b["src"].ne(0), "decoder": b["tgt_in"].ne(0)}
    for stack, n in (("encoder", 2), ("decoder", 3)):
        want = hand_beta(ref["records"][stack], P, residual, keep[stack])
        assert got[stack].shape == (n, n + 1)
        np.testing.assert_allclose(got[stack], want, rtol=1e-9, atol=1e-12)


def _perturbed(model, P, eps, seed):
    """Documented contract: weights (not bias/norm/omega) + eps * sign(N(0,1)), drawn in named_parameters order."""
    g = torch.Generator().manual_seed(seed)
    return {n: p + eps * torch.randn(p.shape, generator=g).sign().double()
            if not (n.endswith("bias") or "norm" in n or "omega" in n) else p for n, p in P.items()}


@pytest.mark.parametrize("residual", SCHEMES)
def test_output_change_matches_float64_hand_computation(residual):
    model, b = hand_model(residual), _batch()
    P, pos = _params(model), model.encoder.embed.positions.double()
    base = hand_forward(P, residual, b["src"], b["tgt_in"], pos)
    keep = {"encoder": b["src"].ne(0), "decoder": b["tgt_in"].ne(0)}

    def change(P2):
        new = hand_forward(P2, residual, b["src"], b["tgt_in"], pos)
        return {s: ((new[s] - base[s])[keep[s]] ** 2).sum().item() for s in keep}

    want = [change(_perturbed(model, P, 1e-3, seed)) for seed in (5,)]
    got = output_change(model, b["src"], b["tgt_in"], eps=1e-3, seed=5)
    for s in keep:
        assert want[0][s] > 0
        assert got[s] == pytest.approx(want[0][s], rel=1e-7)

    # grad_sign: W* = W - eps * sign(dL/dW), L = mean token cross-entropy on tgt_out
    leaves = {n: p.clone().requires_grad_(True) for n, p in P.items()}
    out = hand_forward(leaves, residual, b["src"], b["tgt_in"], pos)
    loss = F.cross_entropy(out["logits"].flatten(0, 1), b["tgt_out"].flatten(), ignore_index=0)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    moved = {n: p - 1e-3 * grads[n].sign() if not (n.endswith("bias") or "norm" in n or "omega" in n) else p
             for n, p in P.items()}
    want_g = change(moved)
    got_g = output_change(model, b["src"], b["tgt_in"], eps=1e-3, perturbation="grad_sign", tgt_out=b["tgt_out"])
    for s in keep:
        assert got_g[s] == pytest.approx(want_g[s], rel=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# invariants and hook hygiene


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


@pytest.mark.parametrize("residual", SCHEMES)
def test_beta_rows_unit_norm_and_lower_triangular(residual):
    torch.manual_seed(0)
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=16, n_heads=2, d_ff=32,
                                           n_enc_layers=3, n_dec_layers=2, residual=residual))
    b = _batch()
    for stack, beta in residual_dependency(model, b["src"], b["tgt_in"]).items():
        np.testing.assert_allclose(np.linalg.norm(beta, axis=1), 1.0, rtol=1e-12)
        assert np.all(beta[np.triu_indices(beta.shape[0], k=2, m=beta.shape[1])] == 0)
        assert np.all(np.diagonal(beta, 1) > 0)


def test_output_change_zero_eps_and_parameters_untouched():
    model, b = hand_model("admin").float(), _batch()
    model.train()
    model.encoder.layers[0].ffn.eval()  # a mixed state that must come back as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert output_change(model, b["src"], b["tgt_in"], eps=0.0) == {"encoder": 0.0, "decoder": 0.0}
    output_change(model, b["src"], b["tgt_in"], eps=1e-2, n_samples=2)
    output_change(model, b["src"], b["tgt_in"], eps=1e-2, perturbation="grad_sign")
    residual_dependency(model, b["src"], b["tgt_in"])
    gradient_norms(model, b["src"], b["tgt_in"], b["tgt_out"])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert torch.equal(p.grad, torch.full_like(p, 0.5)), n
    assert model.training and not model.encoder.layers[0].ffn.training and model.decoder.training
    assert _no_hooks(model)


@pytest.mark.parametrize("diagnostic", ["dependency", "output_change", "grad_sign", "gradients"])
def test_no_hooks_remain_when_a_diagnostic_raises(diagnostic):
    model, b = hand_model("post_ln").float(), _batch()
    too_long = torch.ones(2, 20, dtype=torch.long)  # longer than max_positions=16: raises in the decoder
    calls = {"dependency": lambda: residual_dependency(model, b["src"][:2], too_long),
             "output_change": lambda: output_change(model, b["src"][:2], too_long),
             "grad_sign": lambda: output_change(model, b["src"][:2], too_long, perturbation="grad_sign"),
             "gradients": lambda: gradient_norms(model, b["src"][:2], too_long, too_long)}
    model.train()
    with pytest.raises(ValueError, match="max_positions"):
        calls[diagnostic]()
    assert _no_hooks(model) and model.training


def test_output_change_rejects_bad_arguments():
    model, b = hand_model("post_ln"), _batch()
    with pytest.raises(ValueError, match="mode"):
        output_change(model, b["src"], b["tgt_in"], mode="adam")
    with pytest.raises(ValueError, match="stacks"):
        output_change(model, b["src"], b["tgt_in"], stacks=("middle",))


# ---------------------------------------------------------------------------------------------------------------
# gradient norms


def test_gradient_norms_match_plain_backward():
    model, b = hand_model("post_ln"), _batch()
    got = gradient_norms(model, b["src"], b["tgt_in"], b["tgt_out"])
    assert list(got) == ["encoder.layers.0.self_attn", "encoder.layers.0.ffn", "decoder.layers.0.self_attn",
                         "decoder.layers.0.cross_attn", "decoder.layers.0.ffn"]
    logits = model(b["src"], b["tgt_in"])
    loss = F.cross_entropy(logits.flatten(0, 1), b["tgt_out"].flatten(), ignore_index=0)
    loss.backward()
    for name, rec in got.items():
        sub = model.get_submodule(name)
        want = math.sqrt(sum(p.grad.pow(2).sum().item() for p in sub.parameters()))
        assert rec["param_grad_norm"] == pytest.approx(want, rel=1e-9)
    # the last decoder sub-layer output is the decoder output y (Post-LN); dL/dy = (softmax - onehot) E / n_tokens
    keep = b["tgt_out"].ne(0)
    probs = logits.detach().softmax(-1) - F.one_hot(b["tgt_out"], V).double()
    probs = probs * keep[..., None] / keep.sum()
    want = (probs @ model.decoder.embed.embed_tokens.weight.detach()).norm().item()
    assert got["decoder.layers.0.ffn"]["output_grad_norm"] == pytest.approx(want, rel=1e-9)
    for key in ("output_grad_rel", "param_grad_rel"):
        assert max(r[key] for r in got.values()) == pytest.approx(1.0)


def test_grad_norm_callback_logs_every_n_updates(tmp_path):
    model, b = hand_model("pre_ln").float(), _batch()
    logged = []
    cb = GradNormCallback(every=2)
    for u in (1, 2, 3, 4):
        cb.on_update_end(SimpleNamespace(update=u, model=model, batch=b, log=logged.append))
    assert [r["update"] for r in logged] == [2, 4]
    assert logged[0]["kind"] == "grad_norms" and "encoder.layers.0.ffn" in logged[0]["sublayers"]
    json.dumps(logged)  # JSON-serialisable as the trainer writes it
    path = tmp_path / "g.jsonl"
    GradNormCallback(every=1, path=path).on_update_end(SimpleNamespace(update=7, model=model, batch=b, log=None))
    assert json.loads(path.read_text())["update"] == 7
    with pytest.raises(ValueError):
        GradNormCallback(every=0)


# ---------------------------------------------------------------------------------------------------------------
# the paper's trends at initialisation (the dependency at d_model 512, the output change at 256)


@pytest.fixture(scope="module")
def betas_6l():
    b = random_batch(1000, 4, 20, seed=0)
    return {r: residual_dependency(build_model(r, 6, n_dec_layers=6, batch=b), b["src"], b["tgt_in"])
            for r in SCHEMES}


def test_post_ln_dependency_flat_pre_ln_falls_admin_close_to_pre_ln(betas_6l):
    for stack in ("encoder", "decoder"):
        post, pre, admin = (np.diagonal(betas_6l[r][stack], 1) for r in SCHEMES)
        # Post-LN: every LN renormalises the stream, so x_i keeps ~half of its variance from its own branch
        assert 0.4 <= post.mean() <= 0.55 and np.all((post > 0.35) & (post < 0.6)), post
        # Pre-LN: Var[x_i] grows with i, so the own-branch share falls (this fails if 1/sigma is dropped)
        third = len(pre) // 3
        assert pre[-third:].mean() < pre[:third].mean() - 0.03, pre
        assert post[2:].mean() > pre[2:].mean() + 0.12
        # Admin's profiled omega reproduces Pre-LN's dependency at initialisation
        assert np.abs(admin[2:] - pre[2:]).mean() < 0.05
        assert np.abs(betas_6l["admin"][stack] - betas_6l["pre_ln"][stack]).mean() < \
            0.4 * np.abs(betas_6l["post_ln"][stack] - betas_6l["pre_ln"][stack]).mean()


def test_fit_picks_the_right_shape():
    n = np.array([2, 4, 8, 16, 32, 64])
    assert fit(n, 3 * n + 1)["better"] == "linear"
    assert fit(n, 3 * np.log(n) + 1)["better"] == "log"
    assert fit(n, 3 * n + 1)["linear"]["r2"] == pytest.approx(1.0)


def test_seed_statistics_are_student_t_intervals_and_the_helpers_agree():
    from transformer_ln.diagnostics.stats import columns_ci95, keys_ci95, mean_ci95, mean_ci95_along

    m, lo, hi = mean_ci95([1.0, 3.0])  # 2 seeds: t(1 df) = 12.706, sd = sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
    assert (m, lo, hi) == pytest.approx((2.0, 2.0 - 12.706, 2.0 + 12.706))
    assert mean_ci95([5.0]) == (5.0, 5.0, 5.0)  # one seed: no interval
    per_seed = [[1.0, 2.0, 4.0], [2.0, 2.5, 7.0], [1.5, 3.0, 6.0]]
    means, ci95 = columns_ci95(per_seed)
    assert [[m, *c] for m, c in zip(means, ci95)] == [list(mean_ci95(col)) for col in zip(*per_seed)]
    assert np.array_equal(mean_ci95_along(np.array(per_seed))[:, 2], np.array(mean_ci95([4.0, 7.0, 6.0])))
    rows = [{"encoder": 1.0, "decoder": 4.0}, {"encoder": 3.0, "decoder": 4.0}]
    assert keys_ci95(rows) == ({"encoder": 2.0, "decoder": 4.0},
                               {"encoder": [lo, hi], "decoder": [4.0, 4.0]})


def test_output_change_grows_linearly_for_post_ln_and_logarithmically_otherwise():
    """1 to 50 encoder layers at d_model 256 (encoder only, 4 short sentences, one model per depth).

    Measured ratios (output change at 50 layers / at 6): post_ln 12.7, pre_ln 2.0, admin 2.0 (fits linear, log,
    log), as at d_model 512 (12.0, 2.1, 1.9), which costs four times as much."""
    sweep = depth_sweep(SCHEMES, depths=(1, 2, 6, 16, 50), d_model=256, progress=False)
    res = sweep["results"]
    for r in SCHEMES:
        assert res[r]["sublayers"] == [2, 4, 12, 32, 100]
    ratio = {r: res[r]["output_change"][-1] / res[r]["output_change"][2] for r in SCHEMES}  # 100 vs 12
    assert res["post_ln"]["fit"]["better"] == "linear" and ratio["post_ln"] >= 5, (res["post_ln"], ratio)
    for r in ("pre_ln", "admin"):
        assert res[r]["fit"]["better"] == "log" and ratio[r] <= 3.5, (res[r], ratio)


# ---------------------------------------------------------------------------------------------------------------
# command line

TINY = ["model.d_model=16", "model.n_heads=2", "model.d_ff=32", "model.n_enc_layers=2", "model.n_dec_layers=2"]


def _png_ok(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command, stem, extra", [
    ("dependency", "dependency", []),
    ("output-change", "output_change", ["--depths", "1,2"]),
    ("output-change", "output_change", ["--perturbation", "grad_sign", "model.residual=admin"]),
    ("output-change", "output_change", ["--preset", "reference", "--mode", "eval", "--seeds", "2"]),
    ("gradients", "grad_norms", ["--residuals", "post_ln,pre_ln"]),
])
def test_cli_writes_json_and_png(tmp_path, command, stem, extra, capsys):
    assert analyze([command, "--out", str(tmp_path), *TINY, *extra]) == 0
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    assert data["results"]
    assert _png_ok(tmp_path / f"{stem}.png") and (tmp_path / f"{stem}.pdf").stat().st_size > 0
    assert str(tmp_path / f"{stem}.json") in capsys.readouterr().out


def _fake_run(path, diverged: bool):
    path.mkdir()
    lines = [{"kind": "train", "update": u, "loss": 9.0 - u / 10, "nll": 9.0, "lr": 1e-4 * u, "grad_norm": 1.0 + u,
              "tokens_per_s": 100.0, "omega_min": 1.0, "omega_mean": 1.5, "omega_max": 2.0} for u in range(1, 8)]
    lines.append({"kind": "valid", "update": 5, "epoch": 1, "loss": 8.0, "nll": 8.0, "ppl": 2980.0})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"kind\": \"tr")  # cut short
    (path / "summary.json").write_text(json.dumps({"status": "diverged" if diverged else "completed",
                                                   "diverged_at": 7 if diverged else None,
                                                   "best_valid_loss": 8.0}))
    return path


def test_cli_curves(tmp_path):
    runs = [_fake_run(tmp_path / "admin", False), _fake_run(tmp_path / "post_ln", True)]
    assert analyze(["curves", *map(str, runs), "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert [r["summary"]["status"] for r in data["runs"]] == ["completed", "diverged"]
    assert data["runs"][0]["n_train"] == 7
    assert _png_ok(tmp_path / "out" / "curves.png")


def test_cli_run_directory_analyses_its_best_checkpoint(tmp_path):
    """A real tiny run (2 updates of an Admin model on the built-in corpus): ``--run`` analyses checkpoints/best,
    checks the batch against that model's max_positions, and labels the result with the run and the checkpoint."""
    from conftest import tiny_run_config
    from transformer_ln.runs.checkpoint import load_model
    from transformer_ln.train import Trainer

    run = tmp_path / "run"
    cfg = tiny_run_config(run, "model.residual=admin", "model.max_positions=16", "train.max_updates=2",
                          "data.synthetic_size=200", "data.vocab_size=100")
    summary = Trainer(cfg, cpu=True, quiet=True).run()
    assert summary["status"] == "completed"
    with pytest.raises(UserError, match="max_positions"):  # --seq-len 20 (the default) does not fit 16 positions
        analyze(["dependency", "--run", str(run), "--random-ids", "--out", str(tmp_path / "o")])
    assert analyze(["dependency", "--run", str(run), "--random-ids", "--seq-len", "8", "--out",
                    str(tmp_path / "o")]) == 0
    data = json.loads((tmp_path / "o" / "dependency.json").read_text())
    assert data["checkpoint"] == "run:best" and list(data["results"]) == ["admin"]
    model, _ = load_model(run, which="best")  # the numbers are those of the best checkpoint's weights
    batch = random_batch(min(model.cfg.src_vocab_size, model.cfg.tgt_vocab_size), 4, 8, model.cfg.pad_id, 0)
    betas = residual_dependency(model, batch["src"], batch["tgt_in"])
    for stack, beta in betas.items():
        np.testing.assert_allclose(data["results"]["admin"][stack]["beta"], np.asarray(beta), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("argv, match", [
    (["dependency", "--out", "x", "--run", "/nonexistent/run"], "not a directory"),
    (["output-change", "--out", "x", "--run", ".", "--depths", "1,2"], "--depths"),
    (["gradients", "--out", "x", "--residuals", "post_ln,bogus", *TINY], "bogus"),
    (["dependency", "--out", "x", "model.residual=bogus"], "residual"),
    (["output-change", "--out", "x", "--depths", "1,a"], "comma-separated"),
    (["curves", "/nonexistent/run", "--out", "x"], "metrics.jsonl"),
    (["histogram", "--out", "x"], "invalid choice"),
])
def test_cli_user_errors(argv, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=match):
        analyze(argv)


# ---------------------------------------------------------------------------------------------------------------
# definitions: the reference's (Transformer-Clinic's plot_stability) against a float64 re-implementation


def _dropout_mask(shape, p):
    """What transformer_ln's CPU dropout draws: rand >= p, scaled by 1/(1-p) in float32."""
    return torch.rand(shape).ge_(p).mul_(1.0 / (1.0 - p)).double()


def hand_encoder_train(P, residual, src, positions, n_layers, p):
    """Float64 encoder forward in train mode, dropout masks drawn in forward order (embedding, then each
    sub-layer's output); returns the last sub-layer's output (before any final norm)."""
    B, S = src.shape
    allowed = src.ne(0)[:, None, None, :]
    x = (P["encoder.embed.embed_tokens.weight"][src] * math.sqrt(D) + positions[:S]) * _dropout_mask((B, S, D), p)
    for l in range(n_layers):
        e = f"encoder.layers.{l}"
        for name, branch in ((".self_attn", lambda h: _self_attn(h, P, e + ".self_attn.branch.", allowed)),
                             (".ffn", lambda h: _ffn(h, P, e + ".ffn.branch."))):
            prefix = e + name
            h = _ln(x, P, prefix + ".pre_norm")[0] if residual == "pre_ln" else x
            a = branch(h) * _dropout_mask((B, S, D), p)
            x = x + a if residual == "pre_ln" else _ln(x + a, P, prefix + ".post_norm")[0]
    return x


def two_layer_model(residual, dropout=0.1, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=D, n_heads=H, d_ff=16, n_enc_layers=2,
                      n_dec_layers=1, dropout=dropout, residual=residual, max_positions=16)
    model = Seq2SeqTransformer(cfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                prm.add_(0.3 * torch.randn_like(prm))
    return model.double().eval()


@pytest.mark.parametrize("residual", ["pre_ln", "post_ln"])
def test_reference_preset_matches_float64_reimplementation(residual):
    """Unsquared L2 over the whole tensor (pads included) of the last encoder sub-layer's output, before the final
    norm, both passes in train mode with their own dropout masks from one seeded stream."""
    model, b = two_layer_model(residual), _batch()
    P, pos, eps, seed = _params(model), model.encoder.embed.positions.double(), 1e-3, 7
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = hand_encoder_train(P, residual, b["src"], pos, 2, 0.1)
        new = hand_encoder_train(_perturbed(model, P, eps, seed), residual, b["src"], pos, 2, 0.1)
    want = (new - base).pow(2).sum().sqrt().item()
    got = output_change(model, b["src"], b["tgt_in"], eps=eps, seed=seed, preset="reference")
    assert list(got) == ["encoder"] and got["encoder"] == pytest.approx(want, rel=1e-9)
    assert not model.training  # the flags come back


def test_each_definition_option_moves_the_result_as_it_must():
    b = _batch()
    assert b["src"].eq(0).any()  # the fixture has padding
    model = two_layer_model("pre_ln")

    def oc(**kw):
        return output_change(model, b["src"], b["tgt_in"], eps=1e-3, seed=3, **kw)
    sq, l2 = oc(), oc(norm="l2")
    for s in sq:
        assert sq[s] == pytest.approx(l2[s] ** 2, rel=1e-12)
    assert oc(padding="include")["encoder"] > sq["encoder"]  # pads move too
    before = oc(read="before_final_norm")["encoder"]
    assert before != pytest.approx(sq["encoder"], rel=1e-3)  # Pre-LN's final norm sits between the two reads
    post = two_layer_model("post_ln")
    same = [output_change(post, b["src"], b["tgt_in"], eps=1e-3, seed=3, read=r)["encoder"] for r in READ]
    assert same[0] == same[1]  # no final norm: both reads are the same tensor
    # train mode: fresh masks per pass leak dropout noise even with no perturbation; shared masks do not
    assert output_change(model, b["src"], b["tgt_in"], eps=0.0, mode="train")["encoder"] > 0
    assert output_change(model, b["src"], b["tgt_in"], eps=0.0, mode="train", masks="shared") == \
        {"encoder": 0.0, "decoder": 0.0}
    ref = oc(preset="reference")
    assert ref == oc(norm="l2", read="before_final_norm", mode="train", padding="include", stacks=("encoder",))


READ = ("stack_output", "before_final_norm")


def test_perturbation_names_and_the_old_mode_argument():
    model, b = hand_model("post_ln"), _batch()
    default = output_change(model, b["src"], b["tgt_in"], perturbation="grad_sign", tgt_out=b["tgt_out"])
    assert default == output_change(model, b["src"], b["tgt_in"], eps=1e-6, perturbation="grad_sign",
                                    tgt_out=b["tgt_out"])  # the reference's step for its gradient mode
    with pytest.warns(DeprecationWarning, match="perturbation"):
        old = output_change(model, b["src"], b["tgt_in"], mode="grad_sign", tgt_out=b["tgt_out"])
    assert old == default
    with pytest.raises(ValueError, match="contradicts"):
        output_change(model, b["src"], b["tgt_in"], mode="grad_sign", perturbation="random")
    with pytest.raises(ValueError, match="preset"):
        output_change(model, b["src"], b["tgt_in"], preset="paper")


def test_train_mode_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = Seq2SeqTransformer(ModelConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=D, n_heads=H, d_ff=16,
                                           n_enc_layers=1, n_dec_layers=1, norm="batchnorm", max_positions=16))
    before = {n: x.clone() for n, x in model.named_buffers()}
    b = _batch()
    output_change(model, b["src"], b["tgt_in"], mode="train")
    assert all(torch.equal(x, before[n]) for n, x in model.named_buffers())


def test_depth_sweep_with_seeds_reports_means_intervals_and_fits():
    kw = dict(d_model=16, n_heads=2, vocab_size=30, batch_size=2, seq_len=6, progress=False, seeds=3)
    sq, l2 = depth_sweep(["post_ln", "pre_ln"], depths=(1, 2, 3), **kw,
                         definition=["ours", dataclasses.replace(output_definition("ours"), norm="l2")])
    for r in ("post_ln", "pre_ln"):
        res = sq["results"][r]
        per_seed = np.array(res["per_seed"])
        assert per_seed.shape == (3, 3) and len(set(per_seed[:, 0])) == 3  # the seeds differ
        np.testing.assert_allclose(res["output_change"], per_seed.mean(0), rtol=1e-12)
        lo, hi = np.array(res["ci95"]).T
        assert np.all(lo <= per_seed) and np.all(per_seed <= hi) and np.all(lo < hi)
        np.testing.assert_allclose(per_seed, np.array(l2["results"][r]["per_seed"]) ** 2, rtol=1e-12)  # same models
        fs = res["fit_seeds"]
        assert fs["seeds"] == 3 and fs["wins"]["linear"] + fs["wins"]["log"] == 3
        assert fs["linear"]["r2_min"] <= fs["linear"]["r2_mean"] <= fs["linear"]["r2_max"]
    assert sq["definition"]["norm"] == "squared" and l2["definition"]["text"].startswith("|ΔF|,")
    one = depth_sweep(["pre_ln"], depths=(1, 2, 3), **{**kw, "seeds": 1})
    assert one["results"]["pre_ln"]["per_seed"][0] == sq["results"]["pre_ln"]["per_seed"][0]  # seed 0 is seed 0


def test_cli_reference_preset_with_seeds(tmp_path):
    assert analyze(["output-change", "--out", str(tmp_path), *TINY, "model.residual=pre_ln", "--preset",
                    "reference", "--seeds", "3"]) == 0
    data = json.loads((tmp_path / "output_change.json").read_text())
    assert data["definition"]["norm"] == "l2" and data["definition"]["mode"] == "train"
    assert data["seeds"] == [0, 1, 2] and data["eps"] == 1e-4
    vals = [r["encoder"] for r in data["per_seed"]["pre_ln"]]
    lo, hi = data["ci95"]["pre_ln"]["encoder"]
    assert lo <= min(vals) and max(vals) <= hi and data["results"]["pre_ln"]["encoder"] == pytest.approx(
        np.mean(vals))
    with pytest.raises(UserError, match="--perturbation grad_sign"):
        analyze(["output-change", "--out", str(tmp_path), *TINY, "--mode", "grad_sign"])
    assert analyze(["dependency", "--out", str(tmp_path), *TINY, "model.residual=post_ln", "--seeds", "2"]) == 0
    dep = json.loads((tmp_path / "dependency.json").read_text())["results"]["post_ln"]["encoder"]
    assert np.all(np.array(dep["ci95_low"]) <= np.array(dep["beta"]) + 1e-12)


def test_admin_init_on_a_plain_stack_of_our_layers_equals_the_model_profile():
    """The same layers profiled inside a Seq2SeqTransformer (encoder) and as an nn.Sequential of EncoderLayers."""
    from torch import nn

    from transformer_ln import EncoderLayer
    from transformer_ln.model.admin import admin_init

    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab_size=V, tgt_vocab_size=V, d_model=D, n_heads=H, d_ff=16, n_enc_layers=3,
                      n_dec_layers=1, dropout=0.0, residual="admin", max_positions=16)
    model = Seq2SeqTransformer(cfg)
    src = random_batch(V, batch_size=3, seq_len=6, seed=1, ragged=False)["src"]
    want = admin_init(model, src, src)["encoder"]
    stack = nn.Sequential(*model.encoder.layers)
    with torch.no_grad():
        for m in stack.modules():
            if hasattr(m, "omega"):
                m.omega.fill_(1.0)
    x0 = model.encoder.embed(src)
    got = admin_init(stack, x0)
    assert list(got) == ["stack"] and got["stack"] == pytest.approx(want, rel=1e-6) and len(want) == 6
    assert len(set(round(v, 6) for v in want)) == 6  # a real profile, not constants
    with pytest.raises(ValueError, match="n_sublayers"):
        EncoderLayer(D, H, 16, residual="admin", admin_omega="O(logn)")
    with pytest.raises(ValueError, match="n_sublayers"):
        from transformer_ln import DecoderLayer
        DecoderLayer(D, H, 16, residual="admin", admin_omega="O(1)")
    EncoderLayer(D, H, 16, residual="admin")  # profiled omega needs no size
    assert EncoderLayer(D, H, 16, residual="admin", admin_omega="O(1)", depths=(6, 6)).ffn.residual.init_value == \
        pytest.approx(math.sqrt(12))


@pytest.mark.parametrize("command, stem, extra", [
    ("dependency", "dependency", ["--residuals", "post_ln,pre_ln"]),
    ("output-change", "output_change", ["--residuals", "post_ln,pre_ln"]),
    ("output-change", "output_change", ["--depths", "1,2,3", "model.residual=pre_ln"]),
    ("gradients", "grad_norms", ["--residuals", "post_ln,pre_ln"]),
])
def test_cli_prints_the_key_numbers_of_its_json(tmp_path, command, stem, extra, capsys):
    assert analyze([command, "--out", str(tmp_path), *TINY, *extra]) == 0
    rows: dict[str, list[str]] = {}
    for ln in capsys.readouterr().out.splitlines():
        if ln.strip():
            rows.setdefault(ln.split()[0], ln.split()[1:])  # the first row of each scheme
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    results = data[0]["results"] if isinstance(data, list) else data["results"]
    for scheme, r in results.items():
        cells = rows[scheme]  # dependency and gradients: the encoder's row comes first
        if command == "dependency":
            want = [r["encoder"]["diagonal"][0], r["encoder"]["diagonal"][-1], np.mean(r["encoder"]["diagonal"])]
            got = cells[2:5]
        elif command == "gradients":
            enc = sorted((e for e in r.values() if e["stack"] == "encoder"), key=lambda e: e["index"])
            want = [enc[0]["output_grad_rel"], enc[-1]["output_grad_rel"], min(e["output_grad_rel"] for e in enc)]
            got = cells[2:5]
        elif "--depths" in extra:
            want = [r["output_change"][0], r["output_change"][-1], r["ratio"]]
            got = cells[1:4]
            assert cells[4] == r["fit"]["better"]
        else:
            want, got = [r["encoder"], r["decoder"]], cells[:2]
        assert [float(g) for g in got] == pytest.approx(want, rel=1e-3), (scheme, cells)
