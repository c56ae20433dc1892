"""Workers started by ``accelerate launch`` (or ``torchrun``) stop when their launcher dies, and a launch that
would silently train one process instead of several is refused.

``kill -9`` on the launcher cannot forward a signal, and its workers would keep training and writing into the run
directory while the user resumes it. Each worker watches its parent from the first lines of
``transformer_ln.train`` on: once it has been re-parented (the launcher is gone) it exits at once. A worker whose
launcher died before the watch started (while Python and torch were still importing) finds itself adopted already:
its parent is pid 1 or a known reaper (``systemd --user``, ``tini``, ...) that is not a launcher, and it exits at
once too. A run started directly (``transformer-ln train``, under ``nohup``) is left alone.

Standard library only: this module runs before anything heavy is imported.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Optional

LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")  # set by torchrun / accelerate launch
# a parent whose command line holds one of these is a launcher (or our own tool), never a reaper that adopted us
LAUNCHER_MARKS = ("accelerate", "torchrun", "torch.distributed", "deepspeed", "mpirun", "mpiexec", "srun",
                  "transformer_ln", "transformer-ln")
# the processes that adopt orphans: pid 1, or a child subreaper such as a desktop session's `systemd --user`
REAPERS = ("init", "systemd", "tini", "dumb-init", "docker-init", "catatonit", "s6-svscan", "runit")
# where a launcher that started several processes tells each how many there are (torchrun, MPI)
WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    return any(k in os.environ for k in LAUNCHER_ENV)


def _proc(pid: int, what: str) -> list[str]:
    """``/proc/PID/cmdline`` or ``environ`` as a list of strings ([] when unreadable)."""
    try:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            return [s.decode("utf-8", "replace") for s in f.read().split(b"\0") if s]
    except OSError:
        return []


def adopted(parent: int) -> bool:
    """Whether ``parent`` is a process that adopted this one after its launcher died, not the launcher itself."""
    cmd = _proc(parent, "cmdline")
    if any(mark in arg for arg in cmd for mark in LAUNCHER_MARKS):
        return False
    return parent == 1 or (bool(cmd) and os.path.basename(cmd[0]) in REAPERS)


def _stop(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)
    os._exit(143)


def exit_when_launcher_dies(interval_s: float = 0.5) -> bool:
    """Start the watch (once) when this process was started by a launcher; returns whether it watches.

    Exits at once when the launcher is already gone (this process was adopted before the watch started).
    """
    if not launched() or getattr(exit_when_launcher_dies, "_started", False):
        return False
    parent = os.getppid()
    if adopted(parent):
        _stop(f"the launcher that started worker {os.getpid()} is gone (pid {parent} adopted it); the worker stops")
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            if os.getppid() != parent:
                _stop(f"the launcher (pid {parent}) is gone; worker {os.getpid()} stops")

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    exit_when_launcher_dies._started = True
    return True


def _requested_processes(cmd: list[str]) -> Optional[int]:
    """``--num_processes N`` (or an abbreviation argparse accepts, or ``=N``) on the launcher's command line."""
    for i, arg in enumerate(cmd):
        name, eq, value = arg.partition("=")
        if len(name) >= len("--num_p") and "--num_processes".startswith(name):
            value = value if eq else (cmd[i + 1] if i + 1 < len(cmd) else "")
            return int(value) if value.isdigit() else None
    return None


def single_process_launch() -> Optional[str]:
    """Why this process is the only one although ``accelerate launch`` was asked for several, or None.

    Without ``--multi_gpu`` on a machine without GPUs, ``accelerate launch --num_processes 2`` starts ONE process
    (its simple launcher) and sets MASTER_ADDR for it, but no WORLD_SIZE: accelerate then trains one process.
    """
    env = os.environ
    if "ACCELERATE_DYNAMO_BACKEND" not in env or "MASTER_ADDR" not in env or any(k in env for k in WORLD_ENV):
        return None
    parent = os.getppid()
    cmd = _proc(parent, "cmdline")
    asked = _requested_processes(cmd)
    parent_env = _proc(parent, "environ")
    set_by_launcher = bool(parent_env) and not any(e.startswith("MASTER_ADDR=") for e in parent_env)
    if not (asked and asked > 1) and not (asked is None and set_by_launcher):
        return None
    n = asked or "N"
    return (f"accelerate launch started 1 process, not the {n} asked for: without --multi_gpu it runs a single "
            f"process on a machine without GPUs. Add --multi_gpu: `accelerate launch --multi_gpu --num_processes "
            f"{n} -m transformer_ln.train ... --cpu`")
