"""FSDP2 through accelerate on 2 CPU processes (gloo): trains as DDP does, saves, resumes bit-exactly, evaluates.

accelerate shards only on accelerator devices, so the runs are launched through ``tests/fsdp_on_cpu.py``, which lifts
that one check (see its docstring); the sharding, gathering and checkpointing are accelerate's and torch's code.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fault_injection import free_port
from conftest import tiny_run_config
from test_train import metrics, prepare

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_FSDP = REPO / "experiments" / "accelerate" / "fsdp.yaml"
COMMON = ["model.residual=admin", "model.dropout=0.1", "train.update_freq=2", "train.valid_every=3",
          "train.save_every=3", "train.grad_norms_every=3", "data.synthetic_size=300"]


def launch(tmp_path, name, *args, fsdp=True):
    target = ["tests/fsdp_on_cpu.py"] if fsdp else ["-m", "transformer_ln.train"]
    mode = ["--config_file", str(ACCELERATE_FSDP)] if fsdp else ["--multi_gpu"]  # the config the README gives
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
                           *mode, "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *target,
                           *args, "--cpu"], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
    return proc


def checkpoint(run, update):
    ckpt = Path(run) / "checkpoints" / f"update_{update:08d}"
    return load_file(str(ckpt / "model.safetensors")), torch.load(ckpt / "optimizer.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    data = prepare(tmp / "prepared", *COMMON)
    configs = {}
    for name in ("fsdp", "ddp"):
        configs[name] = tmp / f"{name}.yaml"
        tiny_run_config(tmp / name, *COMMON, data).save(configs[name])
    logs = {"fsdp": launch(tmp, "fsdp", str(configs["fsdp"])),
            "ddp": launch(tmp, "ddp", str(configs["ddp"]), fsdp=False)}
    # The resumed run is the FSDP run as if killed after its checkpoint of update 3 (its checkpoint of update 6,
    # best and summary gone, metrics.jsonl still holding updates 4-6): one launch fewer than training it to 3 first.
    shutil.copytree(tmp / "fsdp", tmp / "resumed")
    shutil.rmtree(tmp / "resumed" / "checkpoints" / "update_00000006")
    shutil.rmtree(tmp / "resumed" / "checkpoints" / "best")
    (tmp / "resumed" / "summary.json").unlink()
    logs["resumed"] = launch(tmp, "resumed", "--resume", str(tmp / "resumed"), "train.bleu_at_end=true",
                             "train.beam=1")  # and decoding after a sharded run
    return tmp, logs


def test_fsdp_shards_and_trains_as_ddp_does(runs):
    tmp, logs = runs
    summary = json.loads((tmp / "fsdp" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["updates"] == 6
    assert summary["distributed"] == "FSDP" and summary["processes"] == 2
    assert json.loads((tmp / "ddp" / "summary.json").read_text())["distributed"] == "MULTI_CPU"
    assert "FSDP2: 2 processes, process 0 holds" in logs["fsdp"].stderr + logs["fsdp"].stdout
    # Admin's profile is taken before wrapping, on the whole model: the same omega as under DDP
    assert json.loads((tmp / "fsdp" / "profile.json").read_text()) == json.loads(
        (tmp / "ddp" / "profile.json").read_text())
    f, d = metrics(tmp / "fsdp"), metrics(tmp / "ddp")
    assert [r["loss"] for r in f] == pytest.approx([r["loss"] for r in d], rel=1e-6)
    assert [r["grad_norm"] for r in f] == pytest.approx([r["grad_norm"] for r in d], rel=1e-5)
    assert [r["omega_mean"] for r in f] == pytest.approx([r["omega_mean"] for r in d], rel=1e-6)
    assert [r["loss"] for r in metrics(tmp / "fsdp", "valid")] == pytest.approx(
        [r["loss"] for r in metrics(tmp / "ddp", "valid")], rel=1e-6)
    # the gradient-norm callback saw the whole model: the same per-sub-layer norms as under DDP
    gf, gd = metrics(tmp / "fsdp", "grad_norms"), metrics(tmp / "ddp", "grad_norms")
    assert len(gf) == 2 and [r["update"] for r in gf] == [3, 6]
    for a, b in zip(gf, gd):
        assert a["sublayers"].keys() == b["sublayers"].keys()
        for k in a["sublayers"]:
            assert a["sublayers"][k]["param_grad_norm"] == pytest.approx(b["sublayers"][k]["param_grad_norm"],
                                                                          rel=1e-5)
    # the checkpoint holds the whole model and optimizer, in the format of an unsharded run
    (wf, of), (wd, od) = checkpoint(tmp / "fsdp", 6), checkpoint(tmp / "ddp", 6)
    assert wf.keys() == wd.keys()
    for k in wf:
        assert wf[k].shape == wd[k].shape and torch.allclose(wf[k], wd[k], rtol=1e-5, atol=1e-7), k
    assert of["state"].keys() == od["state"].keys() and of["param_groups"] == od["param_groups"]
    for i in of["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(of["state"][i][k], od["state"][i][k], rtol=1e-5, atol=1e-9), (i, k)


def test_fsdp_resume_is_bit_exact(runs):
    tmp, logs = runs
    assert "resumed from" in logs["resumed"].stderr + logs["resumed"].stdout
    assert [r["update"] for r in metrics(tmp / "resumed")] == [1, 2, 3, 4, 5, 6]  # 4-6 truncated, trained again
    assert [r["loss"] for r in metrics(tmp / "resumed")] == [r["loss"] for r in metrics(tmp / "fsdp")]
    assert json.loads((tmp / "resumed" / "summary.json").read_text())["updates"] == 6
    (wr, orr), (wf, of) = checkpoint(tmp / "resumed", 6), checkpoint(tmp / "fsdp", 6)
    assert all(torch.equal(wr[k], wf[k]) for k in wf)
    for i in of["state"]:
        assert all(torch.equal(orr["state"][i][k], of["state"][i][k]) for k in of["state"][i])


def test_a_run_trained_sharded_is_evaluated_and_resumed_unsharded(runs, tmp_path):
    from transformer_ln.runs.checkpoint import load_model
    from transformer_ln.evaluation.evaluate import evaluate_run
    from transformer_ln.train import Trainer

    tmp, _ = runs
    at_end = json.loads((tmp / "resumed" / "eval_test_best.json").read_text())  # written by the 2 FSDP processes
    hyps = (tmp / "resumed" / "hyps_test_best.txt").read_text().splitlines()
    assert at_end["checkpoint"] == "best" and at_end["n"] == len(hyps) > 0  # both halves gathered
    scores = evaluate_run(tmp / "fsdp", split="valid", checkpoint="best", limit=4)
    assert scores["n"] == 4 and 0.0 <= scores["bleu"] <= 100.0
    model, _ = load_model(tmp / "fsdp", "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    run = tmp_path / "one"
    shutil.copytree(tmp / "fsdp", run)
    cfg = tiny_run_config(run, *COMMON, f"data.prepared={tmp / 'prepared'}", "train.max_updates=8")
    summary = Trainer(cfg, cpu=True, resume=True, quiet=True).run()  # one process goes on from the sharded run
    assert summary["status"] == "completed" and summary["updates"] == 8 and summary["distributed"] == "NO"


def test_a_sharded_run_that_diverges_rolls_back_to_its_last_good_checkpoint(runs):
    tmp, _ = runs
    config = tmp / "diverging.yaml"
    tiny_run_config(tmp / "diverging", *COMMON, f"data.prepared={tmp / 'prepared'}", "optim.lr=30",
                    "optim.warmup_updates=1", "train.save_every=1", "train.max_updates=40",
                    "train.diverge_patience=2", "train.update_freq=1").save(config)
    proc = launch(tmp, "diverging", str(config))
    summary = json.loads((tmp / "diverging" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["distributed"] == "FSDP"
    assert "rolled back to" in proc.stderr + proc.stdout  # the whole checkpoint loaded back into the shards
    weights, _ = checkpoint(tmp / "diverging", summary["last_good_update"])
    assert all(torch.isfinite(w).all() for w in weights.values())
