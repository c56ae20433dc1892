"""A run directory: the names of the files a training run writes, its marker and lock, its metrics and summary.

Everything that reads or writes a run (trainer, evaluation, sweep, plots) takes the names from here. Two rules keep
a user's files safe:

- A run marks its directory (``.transformer_ln_run``); a fresh run deletes only the files in ``RunDir.FILES``
  and only where that marker is (or where an older run left checkpoints). A directory that is not a run but holds
  one of those names is refused, never cleaned.
- One run per directory: the main process holds ``.transformer_ln_lock`` (pid, host, process start time) for the
  whole run. A second run on the same directory stops with one line; a lock left by a process that is no longer
  running is detected, explained and taken over.
"""
from __future__ import annotations

import atexit
import fnmatch
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Optional

from ..atomic import OutOfSpace, no_space, write_text, write_with
from ..config.sections import CONFIG_FILE
from ..errors import UserError


BLEU_HEADER = ("| file | split | checkpoint | update | weights sha256 | sentences | beam | BLEU | chrF |",
               "|" + "---|" * 9)
PPL_HEADER = ("| file | split | checkpoint | tokens | perplexity | bits/byte | word perplexity |",
              "|---|---|---|---|---|---|---|")


def no_space_error(exc: BaseException, path: Path, needed: Optional[int] = None,
                   then: str = "free some space and run the command again") -> Optional[UserError]:
    """``exc`` as one line naming ``path`` and the space it needs when it is a write that lacked space, else None."""
    full = no_space(exc, path, needed, then)
    return None if full is None else UserError(str(full))


class RunDir:
    """Names and policies of one run directory (``train.out_dir``)."""

    CONFIG = CONFIG_FILE
    TOKENIZER = "tokenizer.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    PROFILE = "profile.json"
    CHECKPOINTS = "checkpoints"
    UPDATE_PREFIX = "update_"
    BEST = "best"  # checkpoints/best: a copy of the checkpoint with the lowest validation loss
    AVERAGED = "averaged"  # checkpoints/averaged: the mean of the last N (``transformer-ln average``)
    STATE = "trainer_state.json"  # in each checkpoint: the trainer's position (``training.state.State``)
    CACHE = "cache"
    MARKER = ".transformer_ln_run"
    LOCK = ".transformer_ln_lock"
    RESULTS = "results.md"
    EVAL_SPLITS = ("test", "valid")
    # what a run writes (the marker and the lock are handled apart): the only names a fresh run ever deletes,
    # with the evaluation files of EVAL_PATTERNS (named by split, checkpoint, limit; older runs: eval_<split>.json)
    FILES = (CHECKPOINTS, METRICS, SUMMARY, PROFILE, CONFIG, TOKENIZER, CACHE, RESULTS,
             *(f"eval_{s}.json" for s in EVAL_SPLITS), *(f"hyps_{s}.txt" for s in EVAL_SPLITS))
    EVAL_PATTERNS = tuple(f"{kind}_{s}_*.{ext}" for s in EVAL_SPLITS for kind, ext in (("eval", "json"),
                                                                                       ("hyps", "txt")))

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    __fspath__ = __str__

    config = property(lambda self: self.path / self.CONFIG)
    tokenizer = property(lambda self: self.path / self.TOKENIZER)
    metrics = property(lambda self: self.path / self.METRICS)
    summary = property(lambda self: self.path / self.SUMMARY)
    profile = property(lambda self: self.path / self.PROFILE)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    cache = property(lambda self: self.path / self.CACHE)
    marker = property(lambda self: self.path / self.MARKER)

    @staticmethod
    def eval_stem(split: str, checkpoint: str = BEST, limit: Optional[int] = None, beam: Optional[int] = None,
                  lenpen: Optional[float] = None) -> str:
        """``test_best``, ``test_last_limit300``, ``valid_update_40_beam1``: one name per distinct evaluation, so a
        quick ``--limit`` or another checkpoint never overwrites the full score (beam/lenpen only when given)."""
        parts = [split, re.sub(r"[^A-Za-z0-9_.-]+", "_", str(checkpoint)).strip("_.") or "checkpoint"]
        parts += [f"limit{limit}"] if limit else []
        parts += [f"beam{beam}"] if beam is not None else []
        parts += [f"lenpen{lenpen:g}"] if lenpen is not None else []
        return "_".join(parts)

    def eval_file(self, split: str, checkpoint: str = BEST, limit: Optional[int] = None, beam: Optional[int] = None,
                  lenpen: Optional[float] = None) -> Path:
        return self.path / f"eval_{self.eval_stem(split, checkpoint, limit, beam, lenpen)}.json"

    def hyps_file(self, split: str, checkpoint: str = BEST, limit: Optional[int] = None, beam: Optional[int] = None,
                  lenpen: Optional[float] = None) -> Path:
        return self.path / f"hyps_{self.eval_stem(split, checkpoint, limit, beam, lenpen)}.txt"

    def find_eval(self, split: str = "test") -> Optional[Path]:
        """The full evaluation of the best checkpoint (the headline score), or an older run's eval_<split>.json."""
        for p in (self.eval_file(split), self.path / f"eval_{split}.json"):
            if p.is_file():
                return p
        return None

    def eval_files(self) -> list[Path]:
        return sorted(p for pat in ("eval_*.json",) for p in self.path.glob(pat) if p.is_file())

    def write_results(self) -> Path:
        """``results.md``: every evaluation of this run, one row each (rewritten from the eval files): BLEU and chrF
        of a translation run, perplexity and bits per byte of a language model."""
        rows = []
        for p in self.eval_files():
            try:
                d = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if "ppl" in d:  # a language model's evaluation (transformer_ln.evaluation.lm_eval)
                rows = rows or list(PPL_HEADER)
                rows.append(f"| {p.name} | {d.get('split', '?')} | {d.get('checkpoint', '?')} | "
                            f"{d.get('tokens', '?')} | {d['ppl']:.3f} | {d.get('bits_per_byte', float('nan')):.4f} | "
                            f"{d.get('word_ppl', float('nan')):.4g} |")
                continue
            rows, at = rows or list(BLEU_HEADER), d["update"] if d.get("update") is not None else d.get("averaged", "?")
            cells = [p.name, d.get("split", "?"), d.get("checkpoint", "?"), at, (d.get("weights_sha256") or "?")[:12],
                     *(d.get(k, "?") for k in ("n", "beam", "bleu", "chrf"))]
            rows.append("| " + " | ".join(map(str, cells)) + " |")
        rows = rows or list(BLEU_HEADER)
        write_text(self.path / self.RESULTS, f"# Evaluations of {self.path.name}\n\n" + "\n".join(rows) + "\n")
        return self.path / self.RESULTS

    # ---------------------------------------------------------------------------------------------- what it holds

    def update_checkpoints(self) -> list[Path]:
        """Complete ``checkpoints/update_<n>`` folders, oldest first (``*.tmp`` ones being written are not)."""
        d, prefix = self.checkpoints, self.UPDATE_PREFIX
        if not d.is_dir():
            return []
        return sorted((p for p in d.iterdir() if p.is_dir() and p.name.startswith(prefix)
                       and p.name[len(prefix):].isdigit()), key=lambda p: int(p.name[len(prefix):]))

    def tidy_checkpoints(self) -> list[str]:
        """After a crash: finish an interrupted replacement (``X.old`` without ``X`` becomes ``X`` again) and
        delete half-written ``*.tmp`` folders. Returns what it did, for the log."""
        done = []
        if not self.checkpoints.is_dir():
            return done
        for p in sorted(self.checkpoints.iterdir()):
            if p.name.endswith(".old") and p.is_dir():
                final = p.with_name(p.name[:-len(".old")])
                if final.exists():
                    shutil.rmtree(p)
                else:
                    p.rename(final)
                    done.append(f"restored {final.name}")
        for p in sorted(self.checkpoints.iterdir()):
            if p.name.endswith(".tmp") and p.is_dir():
                shutil.rmtree(p)
                done.append(f"removed the half-written {p.name}")
        return done

    def has_checkpoints(self) -> bool:
        return bool(self.update_checkpoints())

    def is_run(self) -> bool:
        """Marked by a run, or holding checkpoints with a trainer state (runs from before the marker)."""
        return self.marker.is_file() or any((p / self.STATE).is_file() for p in self.update_checkpoints())

    def has_progress(self) -> bool:
        return self.has_checkpoints() or self.summary.is_file()

    def present(self) -> list[str]:
        named = [n for n in self.FILES if (self.path / n).exists()]
        return named + sorted({p.name for pat in self.EVAL_PATTERNS for p in self.path.glob(pat)} - set(named))

    def is_own(self, name: str) -> bool:
        """Whether ``name`` is one a run writes (so a fresh run may delete it)."""
        return name in self.FILES or any(fnmatch.fnmatchcase(name, pat) for pat in self.EVAL_PATTERNS)

    best = property(lambda self: self.checkpoints / self.BEST)

    def read_summary(self) -> Optional["Summary"]:
        from .summary import Summary

        return Summary.load(self.summary) if self.summary.is_file() else None

    # ---------------------------------------------------------------------------------------------- fresh runs

    def create(self) -> None:
        """Create the directory; an unwritable place is one line, not a traceback."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write_test.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise UserError(f"cannot write to train.out_dir={self.path}: {e.strerror or e}; choose a writable "
                            "directory") from None

    def check_fresh(self, overwrite: bool) -> list[str]:
        """What a fresh run would delete here (checked before anything is deleted); refuses what is not ours."""
        present = self.present()
        if not present:
            return []
        if not self.is_run():
            raise UserError(f"{self.path} is not a transformer-ln run directory (no {self.MARKER}) but holds "
                            f"{', '.join(present)}, which a run would overwrite; choose another train.out_dir "
                            "(--overwrite only replaces runs)")
        if self.has_progress() and not overwrite:
            raise UserError(f"run directory {self.path} already holds a run; continue it with `--resume "
                            f"{self.path}`, start over with --overwrite, or set train.out_dir")
        return present

    def clear(self, names: list[str]) -> None:
        """Delete the run files ``names`` (a subset of ``FILES``), then mark the directory as a run's."""
        for name in names:
            assert self.is_own(name), name
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        self.mark()

    def mark(self) -> None:
        if not self.marker.is_file():
            try:
                write_text(self.marker, json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                    "by": "transformer-ln train"}) + "\n")
            except OutOfSpace as e:  # one line on every process (``RunOpening.agree`` passes on UserErrors)
                raise UserError(f"{e}; free some space and run again") from None

    def lock(self) -> "RunLock":
        return RunLock(self.path / self.LOCK)


# ------------------------------------------------------------------------------------------------------ the lock


def _process_start(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), to tell a reused pid apart; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        if state[state.rindex(")") + 2:].split()[0] == "Z":  # killed, not yet reaped: it writes nothing more
            return False
    except (OSError, ValueError):
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


class RunLock:
    """``O_EXCL`` lock file holding the owner's pid, host and process start time; released on exit."""

    def __init__(self, path: Path):
        self.path, self.held, self.note = Path(path), False, None  # note: what acquire() took over, to print

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None

    def _create(self, me: dict) -> bool:
        """Create the lock holding ``me``; False when it exists. A write that fails (a full disk) leaves no lock."""
        data = json.dumps(me) + "\n"
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(data)
            except BaseException:
                self.path.unlink(missing_ok=True)
                raise
            return True
        except FileExistsError:
            return False
        except OSError as e:
            raise (no_space_error(e, self.path, len(data), "free some space and start the run again") or UserError(
                f"cannot write to {self.path.parent}: {e.strerror or e}; choose a writable train.out_dir")) from None

    def acquire(self) -> "RunLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        run = self.path.parent
        for _ in range(50):
            if self._create(me):
                self.held = True
                atexit.register(self.release)
                return self
            holder = self._read()
            if holder == {}:
                continue  # released in between
            if holder is None or "pid" not in holder:  # unreadable: being written right now, or garbage
                try:
                    if time.time() - self.path.stat().st_mtime < 2:  # a fresh one, for up to 2 s; then taken over
                        time.sleep(0.2)
                        continue
                except FileNotFoundError:
                    continue
                holder = {"pid": "?", "host": "?", "since": "?"}
            elif holder.get("host") != me["host"]:
                raise UserError(f"{run} is in use by pid {holder['pid']} on host {holder.get('host')} since "
                                f"{holder.get('since')}; if no run is using it there, delete {self.path}")
            elif holder["pid"] == me["pid"]:
                pass  # this very process (an earlier trainer in it that failed): ours to take
            elif _alive(int(holder["pid"]), holder.get("start")):
                raise UserError(f"{run} is in use by another run (pid {holder['pid']}, since "
                                f"{holder.get('since')}); two runs must not share a directory: wait for it to "
                                "end, stop it, or choose another train.out_dir")
            if holder["pid"] == "?":
                self.note = (f"note: took over an unreadable lock in {run} (empty or garbled: a process was killed "
                             "while writing it, or the disk was full)")
            elif holder["pid"] != me["pid"]:
                self.note = (f"note: took over a stale lock in {run}: pid {holder['pid']} (since "
                             f"{holder.get('since')}) is no longer running, so it was killed or crashed")
            self.path.unlink(missing_ok=True)
        raise UserError(f"could not take the lock {self.path}: other processes keep creating it")

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = self._read()
            if holder and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------ metrics


class MetricsWriter:
    """``metrics.jsonl``: one JSON object a line, appended and closed at once, so its size marks a position.

    Every checkpoint stores that size; resuming truncates the file back to it, so no line is ever written twice.
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line, size = (json.dumps(record) + "\n").encode("utf-8"), self.size()
        try:
            with open(self.path, "ab") as f:
                f.write(line)
        except OSError as e:
            if self.path.exists():
                os.truncate(self.path, size)  # no half line: the file ends where it did
            raise no_space_error(e, self.path, len(line), "free some space, then resume: transformer-ln train "
                                 f"--resume {self.path.parent}") or e from None

    def size(self) -> int:
        return self.path.stat().st_size if self.path.is_file() else 0

    def truncate(self, size: Optional[int], update: int) -> int:
        """Cut the file back to ``size`` bytes (or, for checkpoints without one, to records up to ``update``).

        Returns the number of lines dropped.
        """
        if not self.enabled or not self.path.is_file():
            return 0
        data = self.path.read_bytes()
        if size is not None and size <= len(data):
            kept = data[:size]
        else:  # a checkpoint from before sizes were stored: keep the complete lines up to its update
            kept = b"".join(line for line in data.splitlines(keepends=True)
                            if line.endswith(b"\n") and _update_of(line) <= update)
        if kept == data:
            return 0
        write_with(self.path, lambda tmp: tmp.write_bytes(kept), size=len(kept))  # lacking space: OutOfSpace
        return data.count(b"\n") - kept.count(b"\n")


def _update_of(line: bytes) -> float:
    try:
        return json.loads(line).get("update", 0)
    except (ValueError, AttributeError):
        return float("inf")

