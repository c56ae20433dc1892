"""Honest first results (issue 27, part B): analysis on the run's own sentences, named in every output; settings
that were ignored in silence are one line; validation capped and never twice in a row; the settings header shows
every changed value with its origin; figures whose titles fit at any scheme count; ``translate`` on a folder that is
not a run says so. One tiny training run (a few seconds) serves the analysis and translation tests."""
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from transformer_ln.config import ConfigError, load_run_config
from transformer_ln.errors import UserError
from transformer_ln.train import Trainer

from conftest import tiny_run_config
from test_train_safety import cli, one_line  # noqa: F401 (fixtures)


PREPARED: list[str] = []  # the override that reads the module's prepared tiny corpus (the ``prepared`` fixture)


def config(out_dir, *overrides):
    return tiny_run_config(out_dir, *PREPARED, *overrides)


def train(out_dir, *overrides):
    trainer = Trainer(config(out_dir, *overrides), cpu=True, quiet=True)
    return trainer, trainer.run()


def valid_records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "valid"]


@pytest.fixture(scope="module", autouse=True)
def prepared(tmp_path_factory):
    """The tiny corpus prepared once (``transformer-ln data prepare``); every run of this module reads it."""
    from transformer_ln.data.cli import main as data_main

    root = tmp_path_factory.mktemp("prepared")
    tiny_run_config(root / "unused").save(root / "c.yaml")
    assert data_main(["prepare", str(root / "c.yaml"), "--out", str(root / "data")]) == 0
    PREPARED[:] = [f"data.prepared={root / 'data'}"]
    yield
    PREPARED.clear()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-update translation run of the tiny model."""
    out = tmp_path_factory.mktemp("honest") / "run"
    assert train(out, "train.max_updates=3")[1]["status"] == "completed"
    return out


# ------------------------------------------------------------------------------------- 4: settings ignored in silence


def test_data_files_without_data_source_files_are_one_line(cli):
    with pytest.raises(ConfigError, match=r"data.train_src: given, but data.source='synthetic' .* add "
                                          r"data.source=files"):
        load_run_config(None, ["data.train_src=A", "data.train_tgt=B"])
    res = cli("train", "--cpu", "data.train_src=A", "data.train_tgt=B", "train.max_updates=1")
    one_line(res, "data.source=files")


# ------------------------------------------------------------------------------------------------- 5: validation


def test_valid_max_sentences_caps_every_validation(tmp_path):
    _, summary = train(tmp_path / "capped", "train.max_updates=1", "train.valid_every=1",
                       "train.valid_max_sentences=7")
    assert summary["status"] == "completed"
    assert [r["examples"] for r in valid_records(tmp_path / "capped")] == [7]
    with pytest.raises(ConfigError, match="train.valid_max_sentences"):
        load_run_config(None, ["train.valid_max_sentences=-1"])


def test_the_epoch_end_meeting_the_time_limit_validates_once(tmp_path):
    """The epoch's last update validates; when the time limit passes during that validation, the run ends there
    instead of training one more update and validating again (main: updates 37 and 38 both validated)."""
    limit_s = 2.0
    cfg = config(tmp_path / "r", "train.max_tokens=4000", "train.max_updates=0", "train.max_epochs=3",
                 "train.valid_max_sentences=50", f"train.max_minutes={limit_s / 60}")  # a few batches an epoch
    trainer = Trainer(cfg, cpu=True, quiet=True)
    real = trainer.validate

    def slow_validation():  # a validation that outlasts the limit (a large valid split on a busy machine)
        out = real()
        time.sleep(limit_s)
        return out

    trainer.validate = slow_validation
    summary = trainer.run()
    updates = [r["update"] for r in valid_records(tmp_path / "r")]
    assert len(updates) == len(set(updates)), updates
    assert all(b - a > 1 for a, b in zip(updates, updates[1:])), updates  # not twice in a row
    assert updates[-1] == summary["updates"]


def test_a_standalone_admin_layer_without_admin_omega_warns_what_to_pass():
    from transformer_ln import CausalLayer, DecoderLayer, EncoderLayer

    for layer in (EncoderLayer, DecoderLayer, CausalLayer):
        with pytest.warns(UserWarning, match=r"without admin_omega: every omega starts at 1 .*admin_init.*"
                                             r"admin_omega='O\(logn\)'"):
            layer(16, 2, 32, residual="admin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a choice made is not warned about, nor is a whole model's config
        EncoderLayer(16, 2, 32, residual="admin", admin_omega="profile")
        EncoderLayer(16, 2, 32, residual="admin", admin_omega="O(logn)", n_sublayers=12)


def test_admin_init_on_a_model_that_is_not_ours_says_what_it_needs():
    from transformer_ln import EncoderLayer, admin_init

    class Mine(torch.nn.Module):  # a user's model holding our Admin layers: no .cfg, no encoder/decoder stacks
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 16)
            self.blocks = torch.nn.ModuleList(EncoderLayer(16, 2, 32, residual="admin", admin_omega="profile",
                                                           dropout=0.0) for _ in range(2))

        def forward(self, ids, _unused=None):
            x = self.embed(ids)
            for block in self.blocks:
                x = block(x)
            return x

    model, ids = Mine(), torch.randint(1, 10, (2, 6))
    with pytest.raises(ValueError, match=r"Mine is not our Seq2SeqTransformer .* admin_init\(stack, x, keep=mask\) "
                                         r"without tgt_in") as e:
        admin_init(model, ids, ids)
    assert "\n" not in str(e.value)
    profile = admin_init(model, ids)  # what the message says works: one stack, omega_1 = 1, then > 0
    assert len(profile["stack"]) == 4 and profile["stack"][0] == 1.0 and min(profile["stack"]) > 0


def test_max_tokens_below_the_smallest_batch_warns_once_in_one_line(tmp_path, capsys):
    capsys.readouterr()
    train(tmp_path / "r", "train.max_tokens=8", "train.max_updates=1", "train.valid_max_sentences=4")
    lines = [line for line in capsys.readouterr().err.splitlines() if "train.max_tokens=8" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "raise train.max_tokens to at least" in lines[0]


# ------------------------------------------------------------------------------------------ 6: the settings header


def test_the_settings_header_lists_every_changed_value_with_its_origin(tmp_path):
    from transformer_ln.config.parser import resolve_config

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  save_every: 7\n  log_every: 10\n")
    block = resolve_config([str(config), "model.norm=rmsnorm", "data.unescape=true", "train.valid_every=5",
                            "model.preset=llama"]).settings_block()
    rows = {line.split()[0]: line for line in block.splitlines()[1:] if line.startswith("  ") and "." in line.split()[0]}
    assert rows["model.norm"].split()[1:] == ["rmsnorm", "(override)"]
    assert rows["data.unescape"].split()[1:] == ["True", "(override)"]
    assert rows["train.valid_every"].split()[1:] == ["5", "(override)"]
    assert rows["train.save_every"].split()[1:] == ["7", f"({config})"]
    assert rows["model.bias"].split()[1:] == ["False", "(model.preset=llama)"]
    assert "train.log_every" not in rows  # given, but the default value: nothing changed
    assert "model.dropout" not in rows


# ------------------------------------------------------------------------------------------- 9: translate on a non-run


def test_translate_on_a_folder_that_is_not_a_run_says_so(tmp_path, cli):
    (tmp_path / "notes.txt").write_text("not a run\n")
    for command in (("translate", tmp_path), ("evaluate", tmp_path)):
        line = one_line(cli(*command), "is not a training run directory")
        assert "no checkpoints yet" not in line
