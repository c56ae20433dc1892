"""Fault injection: ``kill -9`` a training run at random moments, resume it, and compare with an uninterrupted run.

    python tests/fault_injection.py --tries 20 --out /tmp/faults

Each try starts a fresh tiny run (``transformer-ln train``, 40 updates, a checkpoint every 3), kills it with
SIGKILL at a moment drawn by the try's mode, then resumes (``--resume``; a fresh start when no checkpoint was
written yet) until the run completes. It passes when the final checkpoint's weights and ``best`` are bitwise those
of the uninterrupted run, ``metrics.jsonl`` holds the same records (each update once) and the summary agrees.
Modes, in turn:

- ``training``: a uniform moment within the training phase (after the first metrics line);
- ``checkpoint``: the moment a checkpoint folder is being written (``checkpoints/*.tmp`` appears);
- ``anytime``: a uniform moment from process start, set-up and tokenizer/cache writes included.

Prints one line per try and the count, e.g. ``fault injection: 20/20 interrupted runs resumed bit-exact``; exits 1
if any try failed. The test suite runs it with ``--tries 2 --updates 9``.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
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
MODES = ("training", "checkpoint", "anytime")
COMPARED = ("kind", "update", "epoch", "loss", "nll", "lr", "grad_norm", "ntokens", "ppl")


UPDATES = [40]


def command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "transformer_ln.train", *OVERRIDES, f"train.max_updates={UPDATES[0]}",
            f"train.out_dir={run}", "--cpu", *extra]


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get(
        "PYTHONPATH", "")}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = start(cmd)
    _, err = proc.communicate(timeout=900)
    return subprocess.CompletedProcess(cmd, proc.returncode, "", err)


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


def resume_until_done(run: Path) -> int:
    """Resume (or start afresh when nothing was checkpointed) until the summary exists; returns the restarts."""
    restarts = 0
    while not (run / "summary.json").is_file():
        restarts += 1
        res = finish(command(run) if not checkpoints(run) else
                     [sys.executable, "-m", "transformer_ln.train", "--resume", str(run), "--cpu"])
        if res.returncode != 0 or restarts > 3:
            raise RuntimeError(f"restart {restarts} failed ({res.returncode}): {res.stderr[-800:]}")
    return restarts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tries", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--updates", type=int, default=40, help="train.max_updates of every run (default 40)")
    p.add_argument("--out", type=Path, required=True, help="scratch folder (emptied first)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    UPDATES[0] = args.updates
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)

    ref = args.out / "reference"
    t0 = time.time()
    proc = start(command(ref))
    while not (ref / "metrics.jsonl").is_file() and proc.poll() is None:
        time.sleep(0.005)
    t_start = time.time() - t0
    while not (ref / "summary.json").is_file() and proc.poll() is None:
        time.sleep(0.005)
    t_train = time.time() - t0 - t_start
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        print(f"the uninterrupted run failed: {err[-2000:]}", file=sys.stderr)
        return 1
    want = fingerprint(ref)
    print(f"reference: {want['summary']['updates']} updates, set-up {t_start:.1f} s, training {t_train:.1f} s")

    passed, killed, counts = 0, 0, {m: 0 for m in MODES}
    for k in range(args.tries):
        mode = MODES[k % len(MODES)]
        counts[mode] += 1
        run = args.out / f"try_{k:03d}"
        what = kill_moment(start(command(run)), run, mode, rng, t_start, t_train)
        killed += what.startswith("killed")
        try:
            restarts = resume_until_done(run)
            got = fingerprint(run)
            diff = [key for key in want if got[key] != want[key]]
        except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as e:
            restarts, diff = -1, [f"error: {e}"]
        ok = not diff
        passed += ok
        print(f"try {k + 1:>3} [{mode:>10}] {what}; {restarts} restart(s): "
              + ("identical to the uninterrupted run" if ok else f"DIFFERS in {', '.join(diff)}"), flush=True)
        if ok:
            shutil.rmtree(run, ignore_errors=True)
    kinds = ", ".join(f"{n} {m}" for m, n in counts.items())
    print(f"fault injection: {passed}/{args.tries} runs identical to the uninterrupted one after kill -9 and resume "
          f"({killed} killed mid-run; modes: {kinds})")
    return 0 if passed == args.tries else 1


if __name__ == "__main__":
    sys.exit(main())
