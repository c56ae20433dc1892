"""Nothing lost, nothing silent under faults (issue 26): workers die with their launcher from the first line of the
module on, a full disk is one line and leaves the run resumable, readers survive a checkpoint being replaced or
pruned, and a launch that would silently train one process is refused. Tiny models; the full-disk tests run on a
size-limited tmpfs where this process may mount one, else under a file-size limit (``fault_injection.SmallDisk``)."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from transformer_ln.errors import UserError
from transformer_ln.runs import checkpoint as ckpt_lib
from transformer_ln.runs.rundir import MetricsWriter, RunDir, RunLock
from transformer_ln.training import launcher

from conftest import tiny_run_config
from fault_injection import LAUNCH, SmallDisk, records as compared_records, running
from test_train_safety import REPO, records, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def one_line_about(msg: str, path: Path) -> None:
    """A full-disk message: one line naming the path and the space it needs."""
    assert "\n" not in msg and str(path) in msg and "needs" in msg, msg
    assert " free" in msg or "file-size limit" in msg, msg


# ---------------------------------------------------------------------------------------------- 1 launcher


def test_workers_stop_when_the_launcher_is_killed_before_the_trainer_exists(tmp_path):
    """kill -9 on `accelerate launch` as soon as its workers exist (they are still importing Python and torch):
    before, the watch started with the trainer, found itself already adopted and never fired."""
    run, config = tmp_path / "run", tmp_path / "tiny.yaml"
    tiny_run_config(run, "train.max_updates=0", "train.max_minutes=2", "data.synthetic_size=200").save(config)
    proc = subprocess.Popen([*LAUNCH, "-m", "transformer_ln.train", str(config), "--cpu"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers: list[int] = []
    try:
        deadline = time.time() + 240
        while len(workers) < 2:
            assert proc.poll() is None and time.time() < deadline, "the launcher started no workers"
            time.sleep(0.02)
            workers = children(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not run.exists()  # killed before any trainer existed
        deadline = time.time() + 40
        while any(running(w) for w in workers):
            assert time.time() < deadline, "workers still running after their launcher was killed"
            time.sleep(0.1)
    finally:
        for w in workers:
            with contextlib.suppress(OSError):
                os.kill(w, signal.SIGKILL)
    assert not (run / RunDir.LOCK).exists()


def test_a_worker_knows_when_it_was_adopted(monkeypatch):
    cmdlines = {1: ["/sbin/init"], 40: ["/usr/lib/systemd/systemd", "--user"], 41: ["python", "-m",
                "accelerate.commands.launch", "--multi_gpu", "-m", "transformer_ln.train"], 42: ["bash"], 1000: []}
    monkeypatch.setattr(launcher, "_proc", lambda pid, what: cmdlines.get(pid, []))
    assert launcher.adopted(1) and launcher.adopted(40)
    assert not launcher.adopted(41) and not launcher.adopted(42) and not launcher.adopted(1000)
    cmdlines[1] = ["/usr/bin/python", "/venv/bin/accelerate", "launch", "-m", "transformer_ln.train"]
    assert not launcher.adopted(1)  # the launcher is pid 1 (a container's entry point)


# ---------------------------------------------------------------------------------------------- 5 one process


def test_requested_processes_on_the_launchers_command_line():
    ask = launcher._requested_processes
    assert ask(["accelerate", "launch", "--num_processes", "2", "-m", "x"]) == 2
    assert ask(["accelerate", "launch", "--num_processes=3", "-m", "x"]) == 3
    assert ask(["accelerate", "launch", "--num_proc", "4", "-m", "x"]) == 4
    assert ask(["accelerate", "launch", "--num_machines", "1", "-m", "x"]) is None


def test_two_processes_without_multi_gpu_is_one_line_not_one_silent_process(tmp_path):
    run, config = tmp_path / "run", tmp_path / "tiny.yaml"
    tiny_run_config(run, "train.max_updates=1").save(config)
    res = subprocess.run([*[a for a in LAUNCH if a != "--multi_gpu"], "-m", "transformer_ln.train", str(config),
                          "--cpu"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = error_lines(res.stderr)
    assert res.returncode != 0 and len(lines) == 1 and "--multi_gpu" in lines[0], res.stderr[-3000:]
    assert "started 1 process, not the 2 asked for" in lines[0]
    assert not (run / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------- 2 full disk


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    d = SmallDisk(tmp_path_factory.mktemp("small") / "disk", size=256 << 20)
    yield d
    d.close()


def limited(disk: SmallDisk, fn, free: int, file_size: int):
    disk.limit(free, file_size)
    try:
        return disk.run_limited(fn)
    finally:
        disk.unlimit()


def test_a_full_disk_at_the_lock_is_one_line_and_leaves_no_lock(disk):
    run = disk.path / "lock"
    run.mkdir()
    lock = run / RunDir.LOCK
    status, msg = limited(disk, lambda: RunLock(lock).acquire().release(), free=0, file_size=0)
    assert status == "error", msg
    one_line_about(msg, lock)
    assert not lock.exists()  # before: a 0-byte lock that made the next run say "other processes keep creating it"
    held = RunLock(lock).acquire()
    assert held.note is None
    held.release()


def test_a_fresh_empty_lock_is_taken_over_with_a_note(tmp_path):
    """Before: an empty lock younger than 10 s (left by a full disk) was "other processes keep creating it"."""
    lock = tmp_path / RunDir.LOCK
    lock.write_text("")
    held = RunLock(lock).acquire()  # waits up to 2 s for a writer that is not there
    assert held.note and "unreadable lock" in held.note and json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()


def test_a_full_disk_at_metrics_is_one_line_and_leaves_no_half_line(disk):
    run = disk.path / "metrics"
    run.mkdir()
    writer = MetricsWriter(run / RunDir.METRICS)
    line = json.dumps({"kind": "train", "update": 1, "pad": "x" * 50}) + "\n"
    writer.path.write_text(line * (4000 // len(line)))  # ends inside a page: the next line is written partly
    before = writer.path.read_bytes()
    status, msg = limited(disk, lambda: writer.write({"kind": "train", "update": 2, "pad": "y" * 400}), free=0,
                          file_size=len(before) + 96)
    assert status == "error", msg
    one_line_about(msg, writer.path)
    assert "--resume" in msg and writer.path.read_bytes() == before


@pytest.mark.parametrize("kind", ["translation", "language_model"])
def test_a_full_disk_at_data_preparation_is_one_line(disk, tmp_path, kind):
    from transformer_ln.data.lm_store import build_lm_prepared
    from transformer_ln.data.store import build_prepared

    data = tiny_run_config(tmp_path, "data.vocab_size=300").data
    out = disk.path / f"prep_{kind}" / "prepared"
    build = build_prepared if kind == "translation" else build_lm_prepared
    status, msg = limited(disk, lambda: str(build(data, out)), free=48 << 10, file_size=48 << 10)
    assert status == "error", msg
    one_line_about(msg, out)
    assert not out.exists() and list(out.parent.iterdir()) == []  # no partial folder left


def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_run_resumes_exactly(disk, tmp_path):
    run, ref = disk.path / "ckpt", tmp_path / "reference"
    settings = ("train.save_every=2", "train.keep_last=3", f"data.cache_dir={tmp_path / 'cache'}")
    train(run, *settings, "train.max_updates=2")
    shutil.copytree(run, ref)
    train(ref, *settings, "train.max_updates=4", resume=True)  # the uninterrupted continuation
    kept = {p.name: (p / "model.safetensors").read_bytes() for p in (run / "checkpoints").iterdir()}

    def resume():
        from transformer_ln.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["train", "--resume", str(run), "--cpu", "train.max_updates=4"])
        return [rc, err.getvalue()]

    # less room than one checkpoint's weights (200 KB), enough for everything else
    status, (rc, stderr) = limited(disk, resume, free=100 << 10, file_size=100 << 10)
    lines = error_lines(stderr)
    assert status == "ok" and rc == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    one_line_about(lines[0], run / "checkpoints" / "update_00000004")
    assert "basic_ios" not in stderr and "unexpected pos" not in stderr
    assert not (run / RunDir.LOCK).exists()
    assert {p.name: (p / "model.safetensors").read_bytes() for p in (run / "checkpoints").iterdir()} == kept

    assert train(run, *settings, "train.max_updates=4", resume=True)["updates"] == 4  # space freed: resume
    for name in ("model.safetensors", "optimizer.pt"):
        assert (run / "checkpoints/update_00000004" / name).read_bytes() == \
            (ref / "checkpoints/update_00000004" / name).read_bytes()
    assert compared_records(run) == compared_records(ref) and [r["update"] for r in records(run)] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- 7 readers


@pytest.fixture
def saved(tmp_path):
    """A run directory and ``save(n)``: writes ``update_<n>`` of a model seeded with n, returns its weights."""
    from transformer_ln.model.causal_lm import build_model

    cfg = tiny_run_config(tmp_path, "model.src_vocab_size=60", "model.tgt_vocab_size=60")
    cfg.save(RunDir(tmp_path).config)

    def save(n: int) -> dict:
        torch.manual_seed(n)
        model = build_model(cfg.model)
        ckpt_lib.save_checkpoint(tmp_path, n, model, {}, cfg, {"update": n})
        return {k: v.clone() for k, v in model.state_dict().items()}
    return tmp_path, save


def same(model, weights: dict) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_reader_of_last_survives_a_prune_between_resolve_and_load(saved, monkeypatch):
    run, save = saved
    save(1), save(2)
    real, seen, newest = ckpt_lib.load_run_config_from, [], {}

    def trainer_meanwhile(ckpt):  # called between resolve and load_weights
        if not seen:
            seen.append(Path(ckpt).name)
            newest.update(save(3))
            ckpt_lib.prune_checkpoints(run, 1)  # the checkpoint being read goes
        return real(ckpt)

    monkeypatch.setattr(ckpt_lib, "load_run_config_from", trainer_meanwhile)
    model, _ = ckpt_lib.load_model(run, "last")
    assert seen == ["update_00000002"] and same(model, newest)


def test_a_reader_of_best_survives_its_replacement(saved, monkeypatch):
    run, save = saved
    save(1)
    ckpt_lib.copy_as(run / "checkpoints/update_00000001", RunDir.BEST)
    newer = save(2)
    best, real, calls = run / "checkpoints" / RunDir.BEST, ckpt_lib.load_run_config_from, []

    def replace_dir_in_steps(ckpt):  # replace_dir(.best.tmp, best), one step per call
        calls.append(Path(ckpt).name)
        if len(calls) == 1:
            shutil.copytree(run / "checkpoints/update_00000002", best.with_name(".best.tmp"))
            best.rename(best.with_name("best.old"))
        elif len(calls) == 2:
            best.with_name(".best.tmp").rename(best)
            shutil.rmtree(best.with_name("best.old"))
        return real(ckpt)

    monkeypatch.setattr(ckpt_lib, "load_run_config_from", replace_dir_in_steps)
    model, _ = ckpt_lib.load_model(run, RunDir.BEST)
    assert same(model, newer) and calls[0] == "best"


def test_average_survives_a_prune_of_a_chosen_checkpoint(saved, monkeypatch):
    run, save = saved
    save(1), save(2)
    three = save(3)
    real, four = ckpt_lib.load_file, {}

    def trainer_meanwhile(path, *a, **kw):
        if not four:
            four.update(save(4))
            ckpt_lib.prune_checkpoints(run, 2)  # update_2, the first of the two chosen, goes
        return real(path, *a, **kw)

    monkeypatch.setattr(ckpt_lib, "load_file", trainer_meanwhile)
    out = ckpt_lib.average_checkpoints(run, 2)
    got = real(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], ((three[k].double() + four[k].double()) / 2).to(three[k].dtype)) for k in got)


def test_readers_never_fail_while_the_trainer_saves_and_prunes(saved):
    run, save = saved
    save(1)
    ckpt_lib.copy_as(run / "checkpoints/update_00000001", RunDir.BEST)
    stop, errors = threading.Event(), []

    def trainer():
        n = 1
        while not stop.is_set():
            n += 1
            save(n)
            ckpt_lib.copy_as(run / f"checkpoints/update_{n:08d}", RunDir.BEST)
            ckpt_lib.prune_checkpoints(run, 1)
            time.sleep(0.02)

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        for i in range(16):
            try:
                ckpt_lib.load_model(run, "last" if i % 2 else RunDir.BEST)
            except UserError as e:
                errors.append(str(e))
    finally:
        stop.set()
        thread.join()
    assert errors == []
