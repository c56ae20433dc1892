"""Nothing lost: divergence keeps the last good weights, idempotent resume, one run per directory, user files
untouched, and every bad input one line (issue 15). Tiny models and a handful of updates, so this stays fast."""
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from transformer_ln.runs.checkpoint import load_model, load_weights, update_checkpoints
from transformer_ln.config import RunConfig, apply_overrides
from transformer_ln.errors import UserError
from transformer_ln.runs.rundir import RunDir, RunLock
from transformer_ln.train import Trainer

from fault_injection import free_port
from conftest import tiny_run_config

REPO = Path(__file__).resolve().parents[1]


def train(out_dir, *overrides, resume=False, overwrite=False) -> dict:
    cfg = tiny_run_config(out_dir, "train.max_updates=4", *overrides)
    return Trainer(cfg, cpu=True, resume=resume, overwrite=overwrite, quiet=True).run()


def records(run_dir, kind="train"):
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """``transformer-ln ARGS`` in this process (no interpreter start-up): exit status, stdout, stderr."""
    from transformer_ln.cli import main

    def run(*args, stdin: bytes | str = b"") -> Result:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)
    return run


def one_line(res, needle):
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(lines) == 1 and needle in lines[0], res.stderr[-2000:]
    return lines[0]


def snapshot(run_dir) -> dict:
    """Every file's bytes (the run directory's whole content), for 'nothing changed' checks."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(Path(run_dir).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A completed 4-update run with checkpoints at 2 and 4 (copy it before changing it)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train(run, "train.save_every=2", "train.keep_last=3")["status"] == "completed"
    assert not (run / RunDir.LOCK).exists()  # released when the run ends
    return run


def copy_of(run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- 1 divergence


def valid_loss_of(run_dir, which) -> float:
    """The valid loss (bits) of a kept checkpoint, measured here from the files alone."""
    from transformer_ln.data import prepare_data
    from transformer_ln.training.task import TranslationTask

    model, cfg = load_model(run_dir, which)
    data = prepare_data(cfg, run_dir)
    total = tokens = 0.0
    sampler = data.sampler("valid", 600, 0, shuffle=False)
    with torch.no_grad():
        for ix in sampler:
            b = data.batch("valid", ix)
            loss, _ = TranslationTask(cfg).loss(model, b)
            total, tokens = total + loss.item(), tokens + b["ntokens"]
    return total / tokens / math.log(2)


@pytest.mark.parametrize("valid_every", [2, 0])
def test_divergence_keeps_the_last_good_weights_as_best_and_last(tmp_path, valid_every):
    # lr jumps from 1e-7 (update 1) to 5 (update 2): the weights after update 2 are blown up (~800 bits)
    summary = train(tmp_path, "optim.lr=10", "optim.warmup_updates=2", "train.save_every=1",
                    f"train.valid_every={valid_every}", "train.max_updates=20")
    for which in ("best", "last"):
        assert valid_loss_of(tmp_path, which) < 30  # train.diverge_loss
    assert summary["status"] == "diverged"
    assert summary["best_valid_loss"] is None or summary["best_valid_loss"] < 30
    assert [p.name for p in update_checkpoints(tmp_path)] == ["update_00000001"]
    assert summary["last_good_update"] == 1 and summary["last_good_checkpoint"] == "checkpoints/update_00000001"
    assert json.loads((tmp_path / "summary.json").read_text())["last_good_update"] == 1


# ---------------------------------------------------------------------------------------------------- 2 resume


def test_resuming_a_finished_run_does_nothing_and_says_so(finished, tmp_path, cli):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    res = cli("train", "--resume", str(run), "--cpu")
    assert res.returncode == 0 and "nothing to do" in res.stderr, res.stderr[-2000:]
    after = snapshot(run)
    after.pop(RunDir.MARKER, None)
    before.pop(RunDir.MARKER, None)
    assert after == before


def test_a_run_killed_before_its_summary_resumes_to_its_summary(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    (run / "summary.json").unlink()
    summary = train(run, resume=True)
    assert summary["status"] == "completed" and summary["updates"] == 4
    assert [r["update"] for r in records(run)] == [1, 2, 3, 4]
    assert [r["update"] for r in records(run, "valid")] == [4]


def test_resume_truncates_metrics_and_continues_exactly(finished, tmp_path):
    whole = train(tmp_path / "whole", "train.max_updates=6")
    run = copy_of(finished, tmp_path)
    shutil.rmtree(update_checkpoints(run)[-1])  # as if killed after update 3, before the checkpoint of update 4
    assert train(run, "train.max_updates=6", resume=True)["updates"] == whole["updates"] == 6
    assert [r["update"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records(run)] == [r["loss"] for r in records(tmp_path / "whole")]
    assert [r["update"] for r in records(run, "valid")] == [6]


def test_a_run_killed_in_its_first_checkpoint_write_starts_again(finished, tmp_path):
    """Found by tests/fault_injection.py: a half-written update_*.tmp is not a checkpoint."""
    run = copy_of(finished, tmp_path)
    for p in update_checkpoints(run)[1:]:
        shutil.rmtree(p)
    update_checkpoints(run)[0].rename(run / "checkpoints" / "update_00000002.tmp")
    shutil.rmtree(run / "checkpoints" / "best")
    (run / "summary.json").unlink()
    with pytest.raises(UserError, match="no complete checkpoint yet"):
        train(run, resume=True)
    assert not (run / "checkpoints" / "update_00000002.tmp").exists()
    assert train(run)["updates"] == 4 and [r["update"] for r in records(run)] == [1, 2, 3, 4]


def test_a_run_killed_while_copying_its_last_checkpoint_as_best_finishes_that_copy(finished, tmp_path):
    """Found by tests/fault_injection.py (CI, N=2): killed while writing .best.tmp after the last checkpoint."""
    run = copy_of(finished, tmp_path)
    last = update_checkpoints(run)[-1]
    shutil.rmtree(run / "checkpoints" / "best")
    shutil.copytree(update_checkpoints(run)[0], run / "checkpoints" / "best")  # best still the earlier update
    shutil.copytree(last, run / "checkpoints" / ".best.tmp")
    (run / "checkpoints" / ".best.tmp" / "model.safetensors").write_bytes(b"half")
    (run / "summary.json").unlink()
    assert train(run, resume=True)["updates"] == 4
    best = run / "checkpoints" / "best"
    assert (best / "model.safetensors").read_bytes() == (last / "model.safetensors").read_bytes()
    assert not (run / "checkpoints" / ".best.tmp").exists()


# ---------------------------------------------------------------------------------------------------- 3 lock


def test_a_second_process_on_a_directory_in_use_exits_with_one_line(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "transformer_ln.train", *[f"{k}={v}" for k, v in {
        "model.d_model": 32, "model.n_heads": 4, "model.d_ff": 64, "model.n_enc_layers": 1, "model.n_dec_layers": 1,
        "data.synthetic_size": 400, "data.vocab_size": 200, "train.max_tokens": 600, "train.max_updates": 0,
        "train.max_epochs": 0, "train.max_minutes": 5, "train.bleu_at_end": False, "train.out_dir": run}.items()],
        "--cpu"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.2)
        config, tokenizer = (run / "config.yaml").read_bytes(), (run / "tokenizer.json").read_bytes()
        second = subprocess.run([sys.executable, "-m", "transformer_ln.cli", "train", "--cpu", "--overwrite",
                                 f"train.out_dir={run}", "train.max_updates=2"], capture_output=True, text=True,
                                cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        one_line(second, "in use by another run")
        assert first.poll() is None  # the first run is still training, its files untouched
        assert (run / "config.yaml").read_bytes() == config and (run / "tokenizer.json").read_bytes() == tokenizer
    finally:
        first.kill()
        first.wait()
    ups = [r["update"] for r in records(run)]
    assert ups == list(range(1, len(ups) + 1)) and ups


def test_a_stale_lock_is_explained_and_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / RunDir.LOCK
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "since": "earlier"}))
    held = RunLock(lock).acquire()
    assert held.note and str(dead.pid) in held.note and "no longer running" in held.note
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


def test_workers_stop_when_the_launcher_is_killed(tmp_path, capsys):
    """kill -9 on `accelerate launch`: its two workers exit by themselves, and the run resumes."""
    run = tmp_path / "run"
    config = tmp_path / "tiny.yaml"
    tiny_run_config(run, "train.max_updates=0", "train.max_minutes=2", "train.save_every=1",
                    "data.synthetic_size=200", "model.n_enc_layers=1", "model.n_dec_layers=1").save(config)
    launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--main_process_port",
                                 str(free_port()), "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                                 "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "transformer_ln.train",
                                 str(config), "--cpu"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not update_checkpoints(run):
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.2)
        workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                                   text=True).stdout.split()]
        assert len(workers) == 2
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 20
        while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]
                  for w in workers):
            assert time.time() < deadline, "workers still running after their launcher was killed"
            time.sleep(0.2)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    # rank 0 either released the lock on its way out (its collective failed once rank 1 was gone) or left it
    # behind when its own watch fired; a resume then explains and takes over the stale lock
    stale = (run / RunDir.LOCK).exists()
    capsys.readouterr()
    cfg = RunConfig.from_dict(apply_overrides(RunConfig.load(run / "config.yaml").to_dict(),
                                              ["train.max_minutes=0", "train.max_updates=1"]))
    assert Trainer(cfg, cpu=True, resume=True, quiet=True).run()["status"] == "completed"
    assert ("stale lock" in capsys.readouterr().err) == stale and not (run / RunDir.LOCK).exists()


# ---------------------------------------------------------------------------------------------------- 4 user files


def test_a_fresh_run_never_deletes_files_it_did_not_write(tmp_path):
    user = tmp_path / "mine"
    (user / "cache").mkdir(parents=True)
    (user / "cache" / "important.txt").write_text("keep me")
    (user / "eval_test.json").write_text("{}")
    (user / "config.yaml").write_text("mine: true\n")
    before = snapshot(user)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a transformer-ln run directory"):
            train(user, overwrite=overwrite)
        assert snapshot(user) == before


def test_overwrite_with_a_bad_data_path_keeps_the_old_run(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    before = snapshot(run)
    with pytest.raises(UserError, match="data.train_src: file .*missing.txt does not exist"):
        train(run, "data.source=files", f"data.train_src={tmp_path}/missing.txt", f"data.train_tgt={tmp_path}/t",
              f"data.valid_src={tmp_path}/v", f"data.valid_tgt={tmp_path}/w", overwrite=True)
    assert snapshot(run) == before


def test_overwrite_deletes_only_run_files(finished, tmp_path):
    run = copy_of(finished, tmp_path)
    (run / "notes.txt").write_text("mine")
    assert train(run, "train.max_updates=1", overwrite=True)["updates"] == 1
    assert (run / "notes.txt").read_text() == "mine" and len(records(run)) == 1


# ---------------------------------------------------------------------------------------------------- 5, 8 bad input


def test_unwritable_out_dir_is_one_line(tmp_path):
    if os.geteuid() == 0:
        target = "/sys/transformer_ln_test/run"  # sysfs refuses even root
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "run")
    with pytest.raises(UserError, match="cannot write to train.out_dir"):
        train(target)


def test_non_tensor_pickles_are_refused_and_resume_falls_back(finished, tmp_path, cli):
    import argparse

    run = copy_of(finished, tmp_path)
    last, previous = update_checkpoints(run)[-1], update_checkpoints(run)[-2]
    torch.save({"state": argparse.Namespace(x=1)}, last / "optimizer.pt")
    summary = train(run, "train.max_updates=5", resume=True)  # update_4 is refused, update_2 is readable
    assert summary["updates"] == 5 and [r["update"] for r in records(run)] == [1, 2, 3, 4, 5]
    run2 = copy_of(finished, tmp_path / "b")
    for ckpt in update_checkpoints(run2):
        torch.save({"state": argparse.Namespace(x=1)}, ckpt / f"rng_0.pt")
    config_before = (run2 / "config.yaml").read_bytes()
    res = cli("train", "--resume", str(run2), "--cpu", "train.max_updates=9")
    line = one_line(res, "holds objects other than tensors")
    assert "weights_only" not in line and "--checkpoint" not in line
    assert (run2 / "config.yaml").read_bytes() == config_before  # a failed resume rewrites nothing


def test_corrupt_tokenizer_and_config_are_one_line(finished, tmp_path, cli):
    run = copy_of(finished, tmp_path)
    (run / "tokenizer.json").write_text("{not json")
    one_line(cli("translate", str(run), "--cpu", stdin="a dog .\n"), "tokenizer.json")
    one_line(cli("evaluate", str(run), "--cpu", "--limit", "2"), "tokenizer.json")
    (run / "config.yaml").write_text("model: [unclosed\n")
    one_line(cli("train", "--resume", str(run), "--cpu"), "config.yaml is not valid YAML")


def test_translate_input_non_utf8_and_empty_lines(finished, tmp_path, cli):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 .\n".encode("latin-1"))
    one_line(cli("translate", str(finished), "--cpu", "--input", str(bad)), "not UTF-8")
    one_line(cli("translate", str(finished), "--cpu", stdin=bad.read_bytes()), "not UTF-8")
    res = cli("translate", str(finished), "--cpu", "--beam", "1", stdin="a dog .\n\nthe cat .\n")
    assert res.returncode == 0 and res.stdout.split("\n")[1] == "" and len(res.stdout.splitlines()) == 3


def test_shape_mismatch_names_the_tensor(finished):
    from transformer_ln.model.seq2seq import Seq2SeqTransformer

    _, cfg = load_model(finished, "last")
    other = Seq2SeqTransformer(RunConfig.from_dict({**cfg.to_dict(), "model": {**cfg.model.to_dict(),
                                                                                "d_ff": 96}}).model)
    with pytest.raises(UserError, match=r"tensor \S+ffn\S+ has shape \[64\S*\] there but \[96\S*\] in the model"):
        load_weights(other, update_checkpoints(finished)[-1])


# ---------------------------------------------------------------------------------------------------- 6 faults


def test_fault_injection_at_small_n(tmp_path):
    """tests/fault_injection.py at N=2 (the README's figure is N >= 20): kill -9, resume, compare."""
    res = subprocess.run([sys.executable, str(REPO / "tests" / "fault_injection.py"), "--tries", "2", "--updates",
                          "9", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    print(res.stdout)
    assert res.returncode == 0 and "fault injection: 2/2 runs identical" in res.stdout, res.stdout + res.stderr[-2000:]
