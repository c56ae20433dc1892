"""Issue 26, items 3-6 and 8: `best` holds validated weights, a resume keeps the training trajectory (or is told to
change it), absurd sizes and learning rates are one line before any allocation, a batch budget below one example is
said once, and a standalone layer is never silently given the constants of a 1-layer model."""
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from transformer_ln import DecoderLayer, EncoderLayer
from transformer_ln.errors import UserError
from transformer_ln.model.causal_lm import CausalLayer
from transformer_ln.model.schemes import deepnorm_constants
from transformer_ln.runs.checkpoint import load_model, update_checkpoints
from transformer_ln.runs.rundir import RunDir
from transformer_ln.train import Trainer

from conftest import tiny_run_config

ALLOW_CHANGES = "TRANSFORMER_LN_RESUME_CHANGES"  # the documented name (transformer_ln.training.resume)

D, H, F = 32, 4, 64


# ---------------------------------------------------------------------------------------- 8 standalone layers


@pytest.mark.parametrize("scheme", ["deepnorm", "subln", "tfixup"])
@pytest.mark.parametrize("cls", [EncoderLayer, DecoderLayer, CausalLayer])
def test_a_standalone_layer_of_a_depth_dependent_scheme_asks_for_its_depths(cls, scheme):
    with pytest.raises(ValueError, match=r"give depths=\(") as e:
        cls(D, H, F, residual=scheme)
    assert "\n" not in str(e.value) and scheme in str(e.value).lower().replace("-", "")
    if cls is EncoderLayer:  # n_sublayers alone cannot say N and M
        with pytest.raises(ValueError, match=r"depths=\(N, M\)"):
            cls(D, H, F, residual=scheme, n_sublayers=12)
    cls(D, H, F, residual=scheme, depths=(0, 6) if cls is CausalLayer else (6, 6))  # told: built


def test_standalone_layers_with_depths_get_their_models_constants():
    assert EncoderLayer(D, H, F, residual="deepnorm", depths=(6, 6)).ffn.residual.alpha == pytest.approx(
        deepnorm_constants(6, 6)["encoder"][0])
    causal = deepnorm_constants(0, 6)["decoder"][0]
    assert CausalLayer(D, H, F, residual="deepnorm", depths=(0, 6)).ffn.residual.alpha == pytest.approx(causal)
    assert CausalLayer(D, H, F, residual="deepnorm", n_sublayers=12).ffn.residual.alpha == pytest.approx(causal)
    with pytest.raises(ValueError, match=r"depths=\(0, M\) or n_sublayers=2M"):
        CausalLayer(D, H, F, residual="admin", admin_omega="O(logn)")
    site = CausalLayer(D, H, F, residual="pre_ln").ffn.site  # no depth-dependent constant: the layer alone
    assert (site.n_enc_layers, site.n_dec_layers, site.n_sublayers) == (0, 1, 2)
    for scheme in ("post_ln", "pre_ln", "rezero", "sandwich", "resi_dual", "admin"):
        EncoderLayer(D, H, F, residual=scheme)  # admin's profiled omega needs no size


# ---------------------------------------------------------------------------------------- training runs


def train(out_dir, *overrides, resume=False, callbacks=None) -> dict:
    cfg = tiny_run_config(out_dir, *overrides)
    return Trainer(cfg, cpu=True, resume=resume, callbacks=callbacks, quiet=True).run()


def records(run_dir, kind="train") -> list[dict]:
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def valid_loss_of(run_dir, which) -> float:
    """The valid loss (bits) of a kept checkpoint, measured here from its files alone."""
    from transformer_ln.data import prepare_data
    from transformer_ln.training.task import TranslationTask

    model, cfg = load_model(run_dir, which)
    data = prepare_data(cfg, run_dir)
    total = tokens = 0.0
    with torch.no_grad():
        for ix in data.sampler("valid", cfg.train.max_tokens, 0, shuffle=False):
            b = data.batch("valid", ix)
            total, tokens = total + TranslationTask(cfg).loss(model, b)[0].item(), tokens + b["ntokens"]
    return total / tokens / math.log(2)


class BestWatch:
    """After every update: which update ``checkpoints/best`` holds (None while there is none)."""

    every = 1

    def __init__(self, run: Path):
        self.state, self.seen = run / "checkpoints" / RunDir.BEST / RunDir.STATE, []

    def on_update_end(self, ctx) -> None:
        self.seen.append(json.loads(self.state.read_text())["update"] if self.state.is_file() else None)


# ---------------------------------------------------------------------------------------- 3 best


def test_best_always_holds_weights_whose_validation_loss_was_measured(tmp_path):
    """save_every=3, valid_every=4: before, best took updates 3 and 6 (never validated) and held 6 after the
    validation of update 4; now the validation that finds a new best checkpoints its own update."""
    run = tmp_path / "run"
    watch = BestWatch(run)
    summary = train(run, "train.max_updates=9", "train.save_every=3", "train.valid_every=4", callbacks=[watch])
    valid = {r["update"]: r["loss"] for r in records(run, "valid")}
    assert sorted(valid) == [4, 8, 9]
    assert watch.seen[:4] == [None] * 4 and set(watch.seen) - {None} <= set(valid), watch.seen
    best = json.loads((run / "checkpoints" / RunDir.BEST / RunDir.STATE).read_text())
    assert valid[best["update"]] == summary["best_valid_loss"] == min(valid.values())
    assert valid_loss_of(run, RunDir.BEST) == pytest.approx(summary["best_valid_loss"], abs=1e-4)
    assert [p.name for p in update_checkpoints(run)][:2] == ["update_00000003", "update_00000004"]


# ---------------------------------------------------------------------------------------- 4 resume


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped after 2 updates (checkpoint at 2): copy it before resuming it."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    assert train(run, "train.max_updates=2", "train.save_every=2")["updates"] == 2
    return run


def copy_of(run, tmp_path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("override, key", [("train.seed=2", "train.seed 1 -> 2"),
                                           ("train.max_tokens=500", "train.max_tokens 600 -> 500"),
                                           ("train.update_freq=2", "train.update_freq 1 -> 2"),
                                           ("optim.lr=0.002", "optim.lr 0.001 -> 0.002"),
                                           ("optim.warmup_updates=20", "optim.warmup_updates 10 -> 20")])
def test_resume_refuses_a_changed_trajectory_in_one_line(stopped, tmp_path, override, key):
    run = copy_of(stopped, tmp_path)
    with pytest.raises(UserError) as e:
        train(run, "train.max_updates=3", override, resume=True)
    msg = str(e.value)
    assert "\n" not in msg and key in msg and f"{ALLOW_CHANGES}={key.split()[0]} " in msg, msg
    assert len(records(run)) == 2 and len(update_checkpoints(run)) == 1  # nothing trained, nothing written


def test_resume_with_changes_named_on_purpose_and_with_a_new_cadence(stopped, tmp_path, monkeypatch, capsys):
    run = copy_of(stopped, tmp_path / "a")
    monkeypatch.setenv(ALLOW_CHANGES, "optim.lr")
    with pytest.raises(UserError, match="train.seed 1 -> 2"):  # allowing one key allows only that key
        train(run, "train.max_updates=3", "train.seed=2", "optim.lr=0.002", resume=True)
    monkeypatch.setenv(ALLOW_CHANGES, "train.seed,optim.lr")
    capsys.readouterr()
    assert train(run, "train.max_updates=3", "train.seed=2", "optim.lr=0.002", resume=True)["updates"] == 3
    note = [line for line in capsys.readouterr().err.splitlines() if "train.seed 1 -> 2" in line]
    assert len(note) == 1 and "optim.lr 0.001 -> 0.002" in note[0]
    assert json.loads((run / "summary.json").read_text())["seed"] == 2
    monkeypatch.delenv(ALLOW_CHANGES)
    run = copy_of(stopped, tmp_path / "b")  # stopping rule, cadence and logging are not the trajectory
    assert train(run, "train.max_updates=4", "train.save_every=1", "train.valid_every=1", "train.log_every=5",
                 "train.keep_last=2", resume=True)["updates"] == 4


# ---------------------------------------------------------------------------------------- 5 a budget below one example


def test_a_batch_budget_below_one_example_is_one_warning_at_start(tmp_path, capsys):
    capsys.readouterr()
    assert train(tmp_path / "run", "train.max_tokens=1", "train.max_updates=2")["updates"] == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.max_tokens=1" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "raise train.max_tokens to at least" in lines[0]
    from transformer_ln.training.task import LanguageModelTask

    lm = LanguageModelTask(tiny_run_config(tmp_path / "lm", "model.arch=decoder_only", "data.vocab_size=300"))
    assert "data.block_size=64" in lm.over_budget(SimpleNamespace(block_size=64), 1)
    assert lm.over_budget(SimpleNamespace(block_size=64), 64) is None


# ---------------------------------------------------------------------------------------- 6 sizes and learning rates


@pytest.mark.parametrize("overrides", [["model.d_model=1000000000"],  # about 600 GB, allocated before
                                       ["model.d_model=512", "model.n_heads=8", "model.d_ff=2048",
                                        "model.n_enc_layers=100000"]])  # a MemoryError deep in torch.nn before
def test_a_model_that_cannot_fit_is_refused_before_allocation(tmp_path, overrides):
    with pytest.raises(UserError) as e:
        train(tmp_path / "run", "train.max_updates=1", *overrides)
    msg = str(e.value)
    assert "\n" not in msg and "cannot fit" in msg and "parameters" in msg and "physical memory (CPU)" in msg, msg
    assert not update_checkpoints(tmp_path / "run")


@pytest.mark.parametrize("model", [
    dict(residual="admin", admin_omega="O(logn)", n_enc_layers=3, n_dec_layers=2),
    dict(residual="subln", share_embeddings=False, positions="sinusoidal"),
    dict(arch="decoder_only", residual="deepnorm", positions="rope", n_dec_layers=3, tie_embeddings=False),
    dict(arch="decoder_only", preset="llama", n_dec_layers=2)])
def test_the_parameter_count_before_building_is_the_models(model):
    from transformer_ln.config import ModelConfig
    from transformer_ln.model.causal_lm import build_model
    from transformer_ln.training.memory import lower_bound, parameter_count

    cfg = ModelConfig(**{"src_vocab_size": 50, "tgt_vocab_size": 50, "d_model": 32, "n_heads": 4, "d_ff": 64,
                         **model})
    real = sum(p.numel() for p in build_model(cfg).parameters())
    assert parameter_count(build_model, cfg) == real and lower_bound(cfg) <= real


def test_learning_rates_that_overflow_are_refused_at_validation():
    from transformer_ln.config import RunConfig
    from transformer_ln.config.sections import ConfigError

    for key in ("optim.lr", "optim.warmup_init_lr"):
        with pytest.raises(ConfigError, match=rf"{key}: got 1e\+308, must be at most 100 "):
            tiny_run_config("/tmp/unused", f"{key}=1e308")
    assert isinstance(tiny_run_config("/tmp/unused", "optim.lr=30"), RunConfig)  # divergence tests use it
