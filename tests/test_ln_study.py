"""The layer normalization paper's claims as the study scripts measure them: weight-rescaling invariance (where it
holds and where it does not), and the LM study's script end to end on the built-in corpus."""
import csv
import sys
from pathlib import Path

import pytest
import torch

from transformer_ln import LayerNormLSTM, LayerNormRNN
from transformer_ln.recurrent import study as ln_study
from conftest import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ln_invariance  # noqa: E402
import lstm_lm  # noqa: E402


def test_rescaling_change_finds_exact_invariance_only_where_ln_follows_the_matrix():
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    run = lambda m: m(x)[0]  # noqa: E731
    torch.manual_seed(0)
    ln = LayerNormLSTM(5, 6, eps=1e-12).double()
    assert max(ln_study.rescaling_change(ln, run, ["weight_ih_l0", "weight_hh_l0"]).values()) < 1e-8
    torch.manual_seed(0)
    plain = LayerNormLSTM(5, 6, norm=None).double()
    assert min(ln_study.rescaling_change(plain, run, ["weight_ih_l0", "weight_hh_l0"]).values()) > 1e-2
    # the vanilla LN-RNN normalizes the sum W_hh h + W_ih x: only scaling both together leaves it unchanged
    torch.manual_seed(0)
    rnn = LayerNormRNN(5, 6, eps=1e-12).double()
    changes = ln_study.rescaling_change(rnn, run, ["weight_ih_l0", ("weight_ih_l0", "weight_hh_l0")])
    assert changes["weight_ih_l0"] > 1e-2 and changes[("weight_ih_l0", "weight_hh_l0")] < 1e-8
    # parameters are restored after each measurement
    before = {k: v.clone() for k, v in rnn.state_dict().items()}
    ln_study.rescaling_change(rnn, run, ["weight_hh_l0"])
    assert all(torch.equal(before[k], v) for k, v in rnn.state_dict().items())


@pytest.mark.parametrize("residual", ["post_ln", "pre_ln"])
def test_transformer_ln_is_not_invariant_to_rescaling_one_matrix(residual):
    """In a Transformer LN normalizes a residual sum x + f(x), not one matrix's output: no single matrix is free."""
    m = tiny_model(residual).double()
    src, tgt = torch.randint(4, 50, (3, 6)), torch.randint(4, 50, (3, 5))
    names = ["encoder.layers.1.self_attn.branch.qkv_proj.weight", "encoder.layers.1.ffn.branch.fc2.weight",
             "decoder.layers.1.cross_attn.branch.kv_proj.weight"]
    changes = ln_study.rescaling_change(m, lambda mod: mod(src, tgt), names)
    assert min(changes.values()) > 1e-3, changes


def test_ln_transformer_sample_does_not_depend_on_batch_mates_and_train_equals_eval():
    m = tiny_model("post_ln")
    src = torch.randint(4, 50, (4, 7))
    tgt = torch.randint(4, 50, (4, 6))
    m.train()
    out = m(src, tgt)
    torch.testing.assert_close(m(src[:1], tgt[:1])[0], out[0], rtol=0, atol=1e-5)
    m.eval()
    torch.testing.assert_close(m(src, tgt), out, rtol=0, atol=1e-6)


def test_invariance_script_writes_its_table(tmp_path):
    assert ln_invariance.main(["--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rescaling.csv")))
    by = {(r["model"], r["matrix"]): float(r["relative_change"]) for r in rows}
    assert by[("LN-LSTM, eps 1e-12", "weight_hh_l0")] < 1e-8 < 1e-2 < by[("LSTM", "weight_hh_l0")]
    assert "| LN-LSTM |" in (tmp_path / "rescaling.md").read_text()


def test_lm_study_script_end_to_end_on_the_builtin_corpus(tmp_path):
    argv = ["--source", "synthetic", "--out", str(tmp_path), "--seeds", "1", "--lrs", "5e-3", "--max-updates", "20",
            "--eval-every", "10", "--emb", "16", "--hidden", "24", "--synthetic-size", "300"]
    assert lstm_lm.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == ["lnlstm-lr0.005-s1", "lstm-lr0.005-s1"]
    for name in ("lstm_vs_lnlstm_valid_ppl.png", "lstm_vs_lnlstm_ppl_ratio.png", "lm_results.csv"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "lm_results.md").read_text()
    assert "| 0.005 | LN-LSTM | 1 |" in table and "| 0.005 | LSTM | 1 |" in table
    mtime = (tmp_path / "lm" / "lstm-lr0.005-s1" / "summary.json").stat().st_mtime
    assert lstm_lm.main(argv) == 0  # rerun: finished runs are skipped, not retrained
    assert (tmp_path / "lm" / "lstm-lr0.005-s1" / "summary.json").stat().st_mtime == mtime


def _tiny_transformer_run(run_dir, norm):
    from transformer_ln.config import RunConfig, apply_overrides
    from transformer_ln.train import DEMO, Trainer

    cfg = RunConfig.from_dict(apply_overrides(DEMO, [
        f"train.out_dir={run_dir}", "train.max_updates=6", "train.valid_every=3", "train.max_minutes=0",
        "train.bleu_at_end=false", "train.max_tokens=256", "optim.warmup_updates=2", f"model.norm={norm}",
        "model.d_model=32", "model.d_ff=64", "model.n_heads=4", "model.n_enc_layers=1", "model.n_dec_layers=1",
        "data.synthetic_size=800", "data.vocab_size=300"]))
    assert Trainer(cfg, cpu=True, quiet=True).run()["status"] == "completed"


def test_batchnorm_train_eval_gap_is_measured_and_none_for_layernorm(tmp_path):
    for norm in ("layernorm", "batchnorm"):
        _tiny_transformer_run(tmp_path / "bn" / f"{norm}-tok256" / "run", norm)
    rows = ln_study.read_norm_runs(tmp_path / "bn")
    assert sorted((r["norm"], r["max_tokens"], r["status"]) for r in rows) == [
        ("batchnorm", 256, "completed"), ("layernorm", 256, "completed")]
    for r in rows:
        r.update(ln_study.valid_nll_two_ways(r["run"]))
    by = {r["norm"]: r for r in rows}
    # LayerNorm has no batch statistics: both ways of evaluating are the same computation
    assert abs(by["layernorm"]["gap"]) < 1e-9
    # BatchNorm's running averages are not the batch's statistics: the two evaluations differ
    assert abs(by["batchnorm"]["gap"]) > 1e-4
    assert "| batchnorm | 256 | completed |" in ln_study.norm_table(rows)
    for plot in (ln_study.plot_norm_vs_batch, ln_study.plot_norm_curves):
        assert plot(rows, tmp_path / f"{plot.__name__}.png").stat().st_size > 0
