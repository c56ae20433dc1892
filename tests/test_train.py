"""Training end to end on the built-in corpus: resume, divergence, processes, learning, CLI errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformer_ln.training.task import TranslationTask
from transformer_ln.runs.checkpoint import average_checkpoints, load_model, update_checkpoints
from transformer_ln.train import Trainer

from fault_injection import free_port
from conftest import tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def train(out_dir, *overrides, resume=False) -> dict:
    return Trainer(tiny_run_config(out_dir, *overrides), cpu=True, resume=resume, quiet=True).run()


def metrics(run_dir, kind="train"):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def cli(*args, env=None, cwd=REPO):
    """``python -m transformer_ln.cli ARGS`` in a new process (interpreter start-up, exit status, stderr)."""
    return subprocess.run([sys.executable, "-m", "transformer_ln.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


@pytest.fixture
def run_cli(capsys):
    """``transformer-ln ARGS`` in this process, the same ``main`` the command runs (no interpreter start-up of a
    few seconds per call): exit status, stdout and stderr, as ``cli`` returns them. An exception that the command
    would have shown as a traceback fails the test where it is raised."""
    from transformer_ln.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 1
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, rc, out.out, out.err)
    return run


def prepare(out_dir, *overrides) -> str:
    """`transformer-ln data prepare` of the tiny corpus; returns the override that makes a run read it."""
    from transformer_ln.data.cli import main as data_main

    config = Path(out_dir).with_suffix(".yaml")
    tiny_run_config(Path(out_dir).with_suffix(".unused"), *overrides).save(config)
    assert data_main(["prepare", str(config), "--out", str(out_dir)]) == 0
    return f"data.prepared={out_dir}"


def test_resume_is_bit_exact(tmp_path):
    whole = train(tmp_path / "a", "train.max_updates=6")  # the run's own cache
    prepared = prepare(tmp_path / "prepared")  # the resumed run reads a prepared directory: the same data
    first = train(tmp_path / "b", "train.max_updates=3", prepared)
    assert first["updates"] == 3
    again = train(tmp_path / "b", "train.max_updates=6", prepared, resume=True)
    assert whole["status"] == again["status"] == "completed" and again["updates"] == 6
    a = load_file(str(update_checkpoints(tmp_path / "a")[-1] / "model.safetensors"))
    b = load_file(str(update_checkpoints(tmp_path / "b")[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(tmp_path / "a")] == [r["loss"] for r in metrics(tmp_path / "b")]


def test_nan_loss_ends_the_run_as_diverged_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    real, calls = TranslationTask.loss, {"n": 0}

    def poisoned(self, model, batch):  # training batches from the 4th on (the guard's probes run in eval)
        calls["n"] += model.training
        loss, nll = real(self, model, batch)
        return (loss * float("nan"), nll) if calls["n"] >= 4 and model.training else (loss, nll)

    monkeypatch.setattr(TranslationTask, "loss", poisoned)
    summary = train(tmp_path, "train.max_updates=20", "train.save_every=1", "train.diverge_patience=3")
    assert summary["status"] == "diverged" and summary["diverged_at"] == 4 and summary["updates"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    assert len(metrics(tmp_path, "skipped")) == 3
    model, _ = load_model(tmp_path, "last")
    assert update_checkpoints(tmp_path)[-1].name.endswith("00000003")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedule_and_admin_profile_in_the_run(tmp_path):
    summary = train(tmp_path, "model.residual=admin", "train.max_updates=4")
    assert summary["status"] == "completed"
    profile = json.loads((tmp_path / "profile.json").read_text())
    assert len(profile["encoder"]) == 4 and len(profile["decoder"]) == 6 and profile["encoder"][0] == 1.0
    lrs = [r["lr"] for r in metrics(tmp_path)]
    want = [1e-7 + t * (1e-3 - 1e-7) / 10 for t in range(4)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert all("omega_mean" in r for r in metrics(tmp_path))
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "tokenizer.json").is_file()


def test_two_processes_match_one_process_with_double_update_freq(tmp_path):
    common = ["model.dropout=0.0", "train.max_updates=3", "data.synthetic_size=300"]
    one = train(tmp_path / "one", *common, "train.update_freq=2")
    assert one["status"] == "completed"
    config = tmp_path / "tiny.yaml"
    tiny_run_config(tmp_path / "two", *common, prepare(tmp_path / "prepared", *common)).save(config)  # both ranks
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
                           "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "transformer_ln.train", str(config), "train.update_freq=1", "--cpu"],
                          capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["processes"] == 2 and two["updates"] == 3
    l1 = [r["loss"] for r in metrics(tmp_path / "one")]
    l2 = [r["loss"] for r in metrics(tmp_path / "two")]
    assert l1 == pytest.approx(l2, rel=1e-4)
    assert [r["lr"] for r in metrics(tmp_path / "one")] == [r["lr"] for r in metrics(tmp_path / "two")]


def test_translate_evaluate_and_average_end_to_end(tmp_path, run_cli):
    prepared = prepare(tmp_path.with_name(tmp_path.name + "-prepared"))
    train(tmp_path, "train.max_updates=4", "train.save_every=1", "train.keep_last=3", prepared)
    assert not (tmp_path / "cache").exists()  # evaluation below reads the prepared directory's text too
    avg = average_checkpoints(tmp_path, 3)
    inputs = [load_file(str(p / "model.safetensors")) for p in update_checkpoints(tmp_path)[-3:]]
    out = load_file(str(avg / "model.safetensors"))
    for k, v in out.items():
        torch.testing.assert_close(v, sum(t[k] for t in inputs) / 3, rtol=1e-6, atol=1e-7)
    (tmp_path / "in.txt").write_text("the small dog sees a cat .\nthree old men walk .\n")
    res = run_cli("translate", str(tmp_path), "--input", str(tmp_path / "in.txt"), "--beam", "2",
                  "--checkpoint", "averaged")
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 2
    res = run_cli("evaluate", str(tmp_path), "--split", "test", "--limit", "20", "--beam", "2")
    assert res.returncode == 0, res.stderr
    scores = json.loads((tmp_path / "eval_test_best_limit20_beam2.json").read_text())
    assert scores["n"] == 20 and "nrefs:1" in scores["bleu_signature"]
    # the score is sacreBLEU's on the hypotheses it wrote against the split's first 20 references, in order
    import sacrebleu

    from transformer_ln.runs.checkpoint import load_run_config_from
    from transformer_ln.data import prepare_data

    hyps = (tmp_path / "hyps_test_best_limit20_beam2.txt").read_text().splitlines()
    refs = [r for _, r in prepare_data(load_run_config_from(tmp_path), tmp_path).text("test")[:20]]
    assert len(hyps) == 20
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=0.006)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=0.006)
    res = run_cli("analyze", "dependency", "--run", str(tmp_path), "--random-ids", "--seq-len", "8", "--out",
                  str(tmp_path / "an"))
    assert res.returncode == 0 and (tmp_path / "an").is_dir(), res.stderr


@pytest.mark.parametrize("args,needle", [
    (["train", "model.n_layer=3"], "model.n_layer"),
    (["train", "optim.lr=fast"], "optim.lr"),
    (["train", "model.residual=bogus"], "residual"),
    (["train", "--resume", "/nonexistent/run"], "does not exist"),
    (["translate", "/nonexistent/run"], "does not exist"),
    (["average", "/nonexistent/run", "--last", "2"], "does not exist"),
])
def test_bad_inputs_give_one_clear_message(args, needle, run_cli):
    res = run_cli(*args)
    assert res.returncode != 0
    assert needle in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_corrupt_checkpoint_and_changed_model_config_are_clear_errors(tmp_path, run_cli):
    train(tmp_path, "train.max_updates=2")
    res = cli("train", "--resume", str(tmp_path), "model.d_model=64", "--cpu")  # a real process, once
    assert res.returncode != 0 and "model.d_model" in res.stderr and "Traceback" not in res.stderr
    (update_checkpoints(tmp_path)[-1] / "model.safetensors").write_bytes(b"garbage")
    for args in (["translate", str(tmp_path), "--checkpoint", "last"],
                 ["train", "--resume", str(tmp_path), "--cpu", "train.max_updates=4"]):  # finished: must load to go on
        res = run_cli(*args)
        assert res.returncode != 0 and "corrupt" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_an_fsdp_launch_accelerate_does_not_shard_is_refused_in_one_line(tmp_path, monkeypatch):
    from transformer_ln import UserError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets; on CPU: no FSDP
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="FSDP.*did not shard.*--multi_gpu"):
        train(tmp_path, "train.max_updates=1")
    monkeypatch.setenv("FSDP_VERSION", "1")  # accelerate's default version; its plugin would fail on CPU
    with pytest.raises(UserError, match="FSDP version 1.*--fsdp_version 2"):
        train(tmp_path, "train.max_updates=1")
    assert not (tmp_path / "metrics.jsonl").exists()
