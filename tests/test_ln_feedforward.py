"""The feed-forward study of Ba et al.'s batch-size claims: every model learns the bundled digits in a few updates,
BatchNorm's output for a sample depends on its batch-mates in training while LayerNorm's (and RMSNorm's, GroupNorm's)
does not, bit for bit, and the study's script runs end to end and resumes from its files."""
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="scikit-learn (pip install -e .[studies]) ships the digits this study reads")

from transformer_ln.config.sections import ConfigError  # noqa: E402
from transformer_ln.recurrent import ff_study  # noqa: E402
from transformer_ln.recurrent.feedforward import (MODEL_NORMS, FFConfig, batch_stats_error, build_model,  # noqa: E402
                                                  evaluate, load_digits_split, train_ff)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import ln_feedforward  # noqa: E402

PAIRS = [(m, n) for m, norms in MODEL_NORMS.items() for n in norms]


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def test_the_split_is_fixed_and_holds_every_digit(digits):
    assert {k: len(v[1]) for k, v in digits.items()} == {"train": 1197, "valid": 300, "test": 300}
    assert all(0.0 <= float(v[0].min()) and float(v[0].max()) <= 1.0 for v in digits.values())
    assert all(set(v[1].tolist()) == set(range(10)) for v in digits.values())
    again = load_digits_split()
    assert all(torch.equal(digits[k][0], again[k][0]) and torch.equal(digits[k][1], again[k][1]) for k in digits)


@pytest.mark.parametrize("model,norm", PAIRS)
def test_each_model_learns_the_digits_in_a_few_updates(digits, model, norm):
    torch.set_num_threads(1)
    s = train_ff(FFConfig(model=model, norm=norm, batch_size=32, lr=3e-3, updates=40, eval_every=20, seed=1), digits)
    first, last = s["history"][0], s["history"][-1]
    assert s["status"] == "completed" and last["update"] == 40
    assert first["test_err"] > 0.6          # untrained: near chance (90%)
    assert last["test_err"] < 0.4, last     # 40 updates of 32 images: far below chance
    assert last["train_nll"] < first["train_nll"] - 1.0


@pytest.mark.parametrize("model,norm", PAIRS)
def test_only_batchnorm_output_depends_on_batch_mates_in_training(digits, model, norm):
    torch.manual_seed(0)
    m = build_model(FFConfig(model=model, norm=norm)).train()
    x = digits["train"][0]
    a, b = x[:8], torch.cat([x[:1], x[100:107]])   # sample 0 at the same place, other batch-mates
    with torch.no_grad():
        same = torch.equal(m(a)[0], m(b)[0])
    assert same == (norm != "batchnorm")


def test_batch_statistics_change_batchnorm_error_only(digits):
    """Evaluated with each test batch's own statistics, LayerNorm's error is its eval-mode error exactly;
    BatchNorm's at batch 2 differs (its running averages are another computation), and the copy leaves them alone."""
    x, y = digits["test"]
    for norm in ("layernorm", "batchnorm"):
        s_cfg = FFConfig(model="mlp", norm=norm, batch_size=16, lr=3e-3, updates=30, eval_every=30)
        torch.manual_seed(s_cfg.seed)
        m = build_model(s_cfg)
        opt = torch.optim.Adam(m.parameters(), lr=s_cfg.lr)
        xt, yt = digits["train"]
        for i in range(30):
            loss = torch.nn.functional.cross_entropy(m(xt[16 * i:16 * i + 16]), yt[16 * i:16 * i + 16])
            opt.zero_grad()
            loss.backward()
            opt.step()
        buffers = {k: v.clone() for k, v in m.named_buffers()}
        eval_err = evaluate(m, x, y)[0]
        batch_err = batch_stats_error(m, x, y, 2)
        assert all(torch.equal(v, dict(m.named_buffers())[k]) for k, v in buffers.items())
        if norm == "layernorm":
            assert batch_err == eval_err
        else:
            assert abs(batch_err - eval_err) > 0.01, (batch_err, eval_err)


def test_config_rejects_a_norm_the_model_lacks_and_non_finite_values():
    with pytest.raises(ConfigError, match="ff.norm: got 'groupnorm' for model 'mlp'"):
        FFConfig(model="mlp", norm="groupnorm")
    with pytest.raises(ConfigError, match="ff.lr"):
        FFConfig(lr=float("nan"))
    assert ff_study.choose_lr([{"config": {"lr": 1.0}, "status": "diverged", "final_valid_err": 0.0,
                                "final_valid_nll": 0.0},
                               {"config": {"lr": 0.1}, "status": "completed", "final_valid_err": 0.5,
                                "final_valid_nll": float("nan")}]) == 0.1


def test_the_study_script_tunes_reports_and_resumes_from_its_files(tmp_path, capsys):
    assert ln_feedforward.main(["--out", str(tmp_path), "--updates", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: ff.updates: got 0, must be a positive number"]
    args = ["--out", str(tmp_path), "--models", "mlp", "--batch-sizes", "8", "--lrs", "1e-3", "1e-2",
            "--seeds", "1", "--updates", "20", "--eval-every", "10", "--jobs", "1"]
    assert ln_feedforward.main(args) == 0
    runs = sorted((tmp_path / "ff").glob("*.json"))
    assert len(runs) == 4 * (2 + 1)               # 4 norms x (2 tuning lrs + 1 seed)
    for name in ("ff_results.md", "ff_results.csv", "ff_tuning.csv", "ff_test_error_vs_updates.png",
                 "ff_train_nll_vs_updates.png", "ff_vs_batch_size.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "ff_results.md").read_text()
    assert table.count("| mlp |") == 8 and "**" in table  # 4 result rows + 4 tuning rows, chosen lr in bold
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    reported, tuning = ff_study.run_study(tmp_path / "ff", ["mlp"], [8], [1e-3, 1e-2], [1], updates=20,
                                          eval_every=10, progress=False)
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps   # everything read back, nothing retrained
    assert len(reported) == 4 and len(tuning) == 8


def test_without_scikit_learn_the_study_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)   # an import of it now fails as if not installed
    assert ln_feedforward.main(["--out", str(tmp_path / "unused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install -e .[studies]" in err[0], err
    assert not (tmp_path / "unused").exists()
