"""Fault injection: ``kill -9`` a training run at random moments, resume it, and compare with an uninterrupted run.

    python tests/fault_injection.py --tries 20 --out /tmp/faults

Each try starts a fresh tiny run (``transformer-ln train``, 40 updates, a checkpoint every 3), kills it with
SIGKILL at a moment drawn by the try's mode, then resumes (``--resume``; a fresh start when no checkpoint was
written yet) until the run completes. It passes when the final checkpoint's weights and ``best`` are bitwise those
of the uninterrupted run, ``metrics.jsonl`` holds the same records (each update once) and the summary agrees.
Modes, in turn:

- ``training``: a uniform moment within the training phase (after the first metrics line);
- ``checkpoint``: the moment a checkpoint folder is being written (``checkpoints/*.tmp`` appears);
- ``anytime``: a uniform moment from process start, set-up and tokenizer/cache writes included;
- ``launcher``: the run is ``accelerate launch --multi_gpu --num_processes 2 ... --cpu`` and the launcher is killed
  at a uniform moment from its start (Python start-up and imports included); both workers must be gone within
  ``WORKERS_GONE_S`` seconds, and it resumes (two processes again) to the uninterrupted two-process run;
- ``full_disk``: the run directory (data cache included) lies on a small file system (``SmallDisk``: a size-limited
  tmpfs where this process may mount one, else a file-size limit, ``RLIMIT_FSIZE``) with a free space drawn
  uniformly from none to what the whole run needs; a run that fails must end with exactly one ``error:`` line naming
  the path it could not write, no traceback and no lock left; then the space is freed and it resumes.

``--modes`` picks some (default: all, in turn). Prints one line per try and the count, e.g. ``fault injection:
20/20 runs identical ...``; exits 1 if any try failed. The test suite runs it with ``--tries 2 --updates 9``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.d_model=32", "model.n_heads=4", "model.d_ff=64", "model.n_enc_layers=2", "model.n_dec_layers=2",
             "model.max_positions=128", "model.share_embeddings=true", "data.synthetic_size=400",
             "data.vocab_size=200", "optim.lr=1e-3", "optim.warmup_updates=10", "train.max_tokens=600",
             "train.max_epochs=0", "train.max_minutes=0", "train.save_every=3",
             "train.valid_every=10", "train.keep_last=2", "train.bleu_at_end=false"]
MODES = ("training", "checkpoint", "anytime", "launcher", "full_disk")


def free_port() -> int:
    """A TCP port nobody listens on now. Each launch names its own (``--main_process_port``), so launches in the
    test suite's parallel workers never meet on accelerate's default port 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), "--multi_gpu",
          "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
WORKERS_GONE_S = 30
COMPARED = ("kind", "update", "epoch", "loss", "nll", "lr", "grad_norm", "ntokens", "ppl")


UPDATES = [40]


def command(run: Path, *extra: str, launcher: bool = False) -> list[str]:
    head = [*LAUNCH, "-m"] if launcher else [sys.executable, "-m"]
    return [*head, "transformer_ln.train", *OVERRIDES, f"train.max_updates={UPDATES[0]}", f"train.out_dir={run}",
            "--cpu", *extra]


def resume_command(run: Path, launcher: bool = False) -> list[str]:
    return [*([*LAUNCH, "-m"] if launcher else [sys.executable, "-m"]), "transformer_ln.train", "--resume", str(run),
            "--cpu"]


def start(cmd: list[str], preexec=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
        "PYTHONPATH", "")}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec)


def finish(cmd: list[str], preexec=None) -> subprocess.CompletedProcess:
    proc = start(cmd, preexec)
    _, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", err)


# ---------------------------------------------------------------------------------------------- a small disk


class SmallDisk:
    """A folder whose free space a test sets: a size-limited tmpfs mounted on it where this process may mount one
    (root; ``TRANSFORMER_LN_NO_TMPFS=1`` forbids it), else a plain folder whose writers run under a file-size limit
    (``RLIMIT_FSIZE`` with SIGXFSZ ignored, so a write past it fails with EFBIG, which the code treats as ENOSPC).

    ``limit(free, file_size)`` leaves ``free`` bytes free on the tmpfs, or (without one) makes ``file_size`` the
    largest file a process started with ``preexec()`` (or run by ``run_limited``) may write; ``unlimit()`` frees
    the space again. ``close()`` unmounts.
    """

    def __init__(self, path: Path, size: int = 512 << 20):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.size, self.file_size = size, None
        self.tmpfs = (os.geteuid() == 0 and not os.environ.get("TRANSFORMER_LN_NO_TMPFS") and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], capture_output=True,
            timeout=30).returncode == 0)

    def used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def _resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def limit(self, free: int, file_size: int) -> None:
        if self.tmpfs:
            page = os.sysconf("SC_PAGE_SIZE")
            if self.used() + free < page:  # a tmpfs of size 0 would have no limit at all: fill one page
                (self.path / ".filler").write_bytes(b"\0" * page)
            self._resize(self.used() + free)
        else:
            self.file_size = file_size

    def unlimit(self) -> None:
        if self.tmpfs:
            self._resize(max(self.size, self.used() + (64 << 20)))
            (self.path / ".filler").unlink(missing_ok=True)
        self.file_size = None

    def preexec(self):
        """For ``subprocess.Popen(preexec_fn=...)``: the file-size limit in the child (None with a tmpfs)."""
        if self.file_size is None:
            return None
        size = self.file_size

        def limit() -> None:
            import resource

            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return limit

    def run_limited(self, fn):
        """``fn()`` under the limit: in this process on a tmpfs, else in a forked child under the file-size limit
        (output to /dev/null). Returns ``("ok", value)`` or ``("error", message)`` for a ``UserError`` (or any
        ``OSError``: ``"OSError: ..."``); ``value`` must be JSON."""
        def call():
            from transformer_ln.errors import UserError
            try:
                return ["ok", fn()]
            except UserError as e:
                return ["error", str(e)]
            except OSError as e:
                return ["error", f"OSError: {e}"]
        limit = self.preexec()
        if limit is None:
            return tuple(call())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: limited, silent, reports through the pipe
            try:
                os.close(r)
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                limit()
                os.write(w, json.dumps(call()).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
        return tuple(json.loads(data)) if data else ("error", "the limited child died without a result")

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.tmpfs = False


def records(run: Path) -> list[tuple]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append(tuple(r.get(k) for k in COMPARED))
    return out


def fingerprint(run: Path) -> dict:
    ckpts = checkpoints(run)
    summary = json.loads((run / "summary.json").read_text())
    return {"last": ckpts[-1].name, "weights": (ckpts[-1] / "model.safetensors").read_bytes(),
            "optimizer": (ckpts[-1] / "optimizer.pt").read_bytes(),
            "best": (run / "checkpoints" / "best" / "model.safetensors").read_bytes(), "metrics": records(run),
            "summary": {k: summary[k] for k in ("status", "updates", "best_valid_loss", "last_good_update")}}


def kill_moment(proc: subprocess.Popen, run: Path, mode: str, rng: random.Random, t_start: float,
                t_train: float) -> str:
    """Wait for the moment of ``mode`` and SIGKILL the run; returns what was happening (for the report)."""
    if mode == "anytime":
        time.sleep(rng.uniform(0, t_start + t_train))
    elif mode == "training":
        while not (run / "metrics.jsonl").is_file() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, t_train))
    else:  # checkpoint: the n-th checkpoint write, n drawn at random
        nth, seen, writing = rng.randint(1, 10), 0, False
        while proc.poll() is None:
            now = any(p.name.endswith(".tmp") for p in (run / "checkpoints").glob("*")) if (
                run / "checkpoints").is_dir() else False
            if now and not writing:
                seen += 1
                if seen >= nth:
                    break
            writing = now
            time.sleep(0.0005)
    if proc.poll() is not None or (run / "summary.json").is_file():
        proc.kill()
        proc.wait()
        return "finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpts = checkpoints(run)
    writing = [p.name for p in (run / "checkpoints").glob("*.tmp")] if (run / "checkpoints").is_dir() else []
    return (f"killed with {len(ckpts)} checkpoint(s) on disk" + (f", newest {ckpts[-1].name}" if ckpts else "")
            + (f", while writing {writing[0]}" if writing else ""))


def checkpoints(run: Path) -> list[Path]:
    d = run / "checkpoints"
    return sorted(p for p in d.glob("update_*") if p.name[len("update_"):].isdigit()) if d.is_dir() else []


def resume_until_done(run: Path, launcher: bool = False) -> int:
    """Resume (or start afresh when nothing was checkpointed) until the summary exists; returns the restarts."""
    restarts = 0
    while not (run / "summary.json").is_file():
        restarts += 1
        res = finish(command(run, launcher=launcher) if not checkpoints(run) else resume_command(run, launcher))
        if res.returncode != 0 or restarts > 3:
            raise RuntimeError(f"restart {restarts} failed ({res.returncode}): {res.stderr[-800:]}")
    return restarts


# ---------------------------------------------------------------------------------------------- the new modes


def workers_of(run: Path, launcher_pid: int) -> list[int]:
    """The processes training ``run`` other than the launcher (its workers, wherever they were re-parented)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != launcher_pid:
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"transformer_ln.train" in cmd and f"train.out_dir={run}".encode() in cmd:
                found.append(int(d.name))
    return found


def running(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (OSError, IndexError):
        return False


def kill_launcher(run: Path, rng: random.Random, t_start: float, t_train: float) -> tuple[str, str | None]:
    """Start the two-process launch, SIGKILL its launcher at a uniform moment; returns (what happened, problem)."""
    proc = start(command(run, launcher=True))
    t0 = time.time()
    time.sleep(rng.uniform(0, t_start + t_train))
    if proc.poll() is not None or (run / "summary.json").is_file():
        proc.wait()
        return "finished before the kill", None
    proc.send_signal(signal.SIGKILL)
    at = time.time() - t0
    proc.wait()
    workers = [w for w in workers_of(run, proc.pid) if running(w)]
    deadline = time.time() + WORKERS_GONE_S
    while any(running(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    gone_after = time.time() - (deadline - WORKERS_GONE_S)
    left = [w for w in workers if running(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    phase = "training" if (run / "metrics.jsonl").is_file() else "start-up"
    what = (f"launcher killed at {at:.1f} s ({phase}), {len(workers)} worker(s) running, gone "
            f"{gone_after:.1f} s later, {len(checkpoints(run))} checkpoint(s)")
    return what, (f"{len(left)} worker(s) still running {WORKERS_GONE_S} s after the launcher was killed"
                  if left else None)


def fill_disk(run: Path, rng: random.Random, disk: SmallDisk, need: tuple[int, int]) -> tuple[str, str | None]:
    """Run on ``disk`` with a drawn free space (or file-size limit); a failure must be one line naming the path."""
    free, file_size = rng.randint(0, need[0]), rng.randint(0, need[1])
    disk.limit(free, file_size)
    try:
        res = finish(command(run), preexec=disk.preexec())
    finally:
        disk.unlimit()
    limit = f"{free} bytes free" if disk.tmpfs else f"files up to {file_size} bytes"
    if res.returncode == 0:
        return f"{limit}: completed within it", None
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    what = f"{limit}: " + (errors[0][:200] if errors else f"exit {res.returncode}")
    if res.returncode != 2 or len(errors) != 1 or "Traceback" in res.stderr:
        return what, f"exit {res.returncode}, {len(errors)} error line(s): {res.stderr[-1500:]}"
    if "cannot write" not in errors[0] or not any(w in errors[0] for w in (" free", "limit")):
        return what, "the error line does not name the path and the space it needs"
    if (run / ".transformer_ln_lock").exists():
        return what, "a lock was left behind"
    return what, None


def reference(out: Path, launcher: bool) -> tuple[dict, float, float]:
    """The uninterrupted run (two processes with ``launcher``): its fingerprint, set-up and training seconds."""
    ref = out / ("reference_2proc" if launcher else "reference")
    t0 = time.time()
    proc = start(command(ref, launcher=launcher))
    while not (ref / "metrics.jsonl").is_file() and proc.poll() is None:
        time.sleep(0.005)
    t_start = time.time() - t0
    while not (ref / "summary.json").is_file() and proc.poll() is None:
        time.sleep(0.005)
    t_train = time.time() - t0 - t_start
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {err[-2000:]}")
    want = fingerprint(ref)
    print(f"reference{' (2 processes)' if launcher else ''}: {want['summary']['updates']} updates, set-up "
          f"{t_start:.1f} s, training {t_train:.1f} s", flush=True)
    return want, t_start, t_train


def disk_needs(ref: Path) -> tuple[int, int]:
    """The ranges the full-disk mode draws from: what the finished run holds (its peak is a little higher, with a
    checkpoint being written and one being copied as best) and its largest file."""
    files = [p.stat().st_size for p in ref.rglob("*") if p.is_file()]
    return sum(files), max(files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tries", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--updates", type=int, default=40, help="train.max_updates of every run (default 40)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, in turn (default all: {MODES})")
    p.add_argument("--out", type=Path, required=True, help="scratch folder (emptied first)")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    rng = random.Random(args.seed)
    UPDATES[0] = args.updates
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    refs: dict[bool, tuple] = {}
    disk = SmallDisk(args.out / "disk") if "full_disk" in modes else None
    try:
        if disk is not None:
            print(f"full disk: {'a tmpfs whose free space is limited' if disk.tmpfs else 'a file-size limit'}")
        passed, faults, counts = 0, 0, {m: 0 for m in modes}
        for k in range(args.tries):
            mode = modes[k % len(modes)]
            counts[mode] += 1
            launcher = mode == "launcher"
            if launcher not in refs:
                refs[launcher] = reference(args.out, launcher)
            want, t_start, t_train = refs[launcher]
            run = (disk.path if mode == "full_disk" else args.out) / f"try_{k:03d}"
            problem = None
            if mode == "launcher":
                what, problem = kill_launcher(run, rng, t_start, t_train)
            elif mode == "full_disk":
                what, problem = fill_disk(run, rng, disk, disk_needs(args.out / "reference"))
            else:
                what = kill_moment(start(command(run)), run, mode, rng, t_start, t_train)
            faults += not what.startswith("finished") and "completed within" not in what
            try:
                restarts = resume_until_done(run, launcher)
                got = fingerprint(run)
                diff = [key for key in want if got[key] != want[key]] + ([problem] if problem else [])
            except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
                restarts, diff = -1, [f"error: {e}"] + ([problem] if problem else [])
            ok = not diff
            passed += ok
            print(f"try {k + 1:>3} [{mode:>10}] {what}; {restarts} restart(s): "
                  + ("identical to the uninterrupted run" if ok else f"DIFFERS in {', '.join(diff)}"), flush=True)
            if ok:
                shutil.rmtree(run, ignore_errors=True)
            elif mode == "full_disk":  # keep it, off the small disk
                shutil.move(str(run), str(args.out / run.name))
    finally:
        if disk is not None:
            disk.close()
    kinds = ", ".join(f"{n} {m}" for m, n in counts.items())
    print(f"fault injection: {passed}/{args.tries} runs identical to the uninterrupted one after the fault and "
          f"resume ({faults} faults mid-run; modes: {kinds})")
    return 0 if passed == args.tries else 1


if __name__ == "__main__":
    sys.exit(main())
