"""Every shipped experiment config builds its model; the sweep runs a grid, collects it and resumes."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer_ln import Seq2SeqTransformer, load_run_config
from transformer_ln.training.sweep import parse_grid

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments" / "configs").glob("*.yaml"))


def test_there_are_configs_for_each_family():
    names = {p.stem for p in CONFIGS}
    for family in ("iwslt14_de_en_6l", "wmt14_en_de_6l", "wmt14_en_de_12l", "wmt14_en_de_18l", "wmt14_en_fr_60l_12l",
                   "multi30k_6l", "multi30k_18l", "cpu_synthetic"):
        assert family in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("residual", ["post_ln", "pre_ln", "admin"])
def test_config_loads_and_builds_its_model(path, residual):
    cfg = load_run_config(path, [f"model.residual={residual}"])
    cfg.train.require_stop()
    v = cfg.data.vocab_size
    model_cfg = type(cfg.model).from_dict({**cfg.model.to_dict(), "src_vocab_size": v, "tgt_vocab_size": v})
    with torch.device("meta"):  # the 60L-12L model would take seconds and GBs to materialise
        model = Seq2SeqTransformer(model_cfg)
    assert len(model.encoder.layers) == cfg.model.n_enc_layers and len(model.decoder.layers) == cfg.model.n_dec_layers


def test_grid_is_the_cross_product():
    points = parse_grid(["residual=post_ln,admin", "depth=6,18", "lr=1e-3", "warmup=100", "seed=1,2"])
    assert len(points) == 8 and len({p.name for p in points}) == 8


def test_sweep_on_a_2_point_grid_collects_results_and_skips_finished_runs(tmp_path):
    # two runs (each a process of its own, a few CPU seconds); the cross product and distinct run names of a
    # larger grid are test_grid_is_the_cross_product's
    cmd = [sys.executable, str(REPO / "experiments" / "sweep.py"), "--out", str(tmp_path), "--cpu",
           "--grid", "residual=post_ln,admin", "depth=1", "lr=1e-3", "warmup=10", "seed=1", "--",
           "model.d_model=32", "model.d_ff=64", "model.n_heads=4", "data.synthetic_size=300", "data.vocab_size=200",
           "train.max_updates=3", "train.bleu_at_end=false", "train.max_tokens=600"]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 2 and {r["residual"] for r in rows} == {"post_ln", "admin"}
    assert all(r["status"] == "completed" and r["updates"] == "3" for r in rows)
    assert "| scheme |" in (tmp_path / "results.md").read_text()
    pngs = list(tmp_path.glob("*.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0 and len(pngs) == 3  # curves + one dependency per run
    stamps = {p: p.stat().st_mtime for p in tmp_path.glob("*/summary.json")}
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert again.returncode == 0 and again.stdout.count("finished, skipped") == 2
    assert stamps == {p: p.stat().st_mtime for p in tmp_path.glob("*/summary.json")}


def test_an_interrupted_sweep_run_is_resumed_where_it_stopped_not_restarted(tmp_path):
    import json
    import shutil

    from transformer_ln.training.sweep import run_grid

    points = parse_grid(["residual=pre_ln", "depth=1", "lr=1e-3", "warmup=10", "seed=1"])
    common = ["model.d_model=32", "model.d_ff=64", "model.n_heads=4", "data.synthetic_size=300",
              "data.vocab_size=200", "train.max_updates=4", "train.save_every=2", "train.keep_last=5",
              "train.bleu_at_end=false", "train.max_tokens=600", "train.valid_every=0"]
    run = run_grid(points, tmp_path, overrides=common, cpu=True, log=lambda *_: None)[0]
    uninterrupted = (run / "metrics.jsonl").read_text()
    (run / "summary.json").unlink()  # as if killed after the checkpoint of update 2
    shutil.rmtree(run / "checkpoints" / "update_00000004")
    shutil.rmtree(run / "checkpoints" / "best")
    said = []
    run_grid(points, tmp_path, overrides=common, cpu=True, log=said.append)
    assert "--resume" in said[0] and "--overwrite" not in said[0]
    assert "resumed from" in (tmp_path / f"{points[0].name}.log").read_text()
    assert json.loads((run / "summary.json").read_text())["updates"] == 4
    def records(text):  # everything but the timings
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in text.splitlines()]

    assert records((run / "metrics.jsonl").read_text()) == records(uninterrupted)  # every update once, bit-exact
