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


def train(out_dir, *overrides):
    trainer = Trainer(tiny_run_config(out_dir, *overrides), cpu=True, quiet=True)
    return trainer, trainer.run()


def valid_records(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "valid"]


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
    cfg = tiny_run_config(tmp_path / "r", "data.synthetic_size=40", "train.max_updates=0", "train.max_epochs=3",
                          f"train.max_minutes={limit_s / 60}")
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
