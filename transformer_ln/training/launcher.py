"""Workers started by ``accelerate launch`` (or ``torchrun``) stop when their launcher dies.

``kill -9`` on the launcher cannot forward a signal, and its workers would keep training and writing into the run
directory while the user resumes it. Each worker watches its parent: once it has been re-parented (the launcher is
gone) it exits at once. A run started directly (``transformer-ln train``, under ``nohup``) is left alone.
"""
from __future__ import annotations

import os
import sys
import threading

LAUNCHER_ENV = ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND")  # set by torchrun / accelerate launch


def launched() -> bool:
    return any(k in os.environ for k in LAUNCHER_ENV)


def exit_when_launcher_dies(interval_s: float = 0.5) -> bool:
    """Start the watch (once) when this process was started by a launcher; returns whether it watches."""
    if not launched() or getattr(exit_when_launcher_dies, "_started", False):
        return False
    parent = os.getppid()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            if os.getppid() != parent:
                print(f"error: the launcher (pid {parent}) is gone; worker {os.getpid()} stops", file=sys.stderr,
                      flush=True)
                os._exit(143)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    exit_when_launcher_dies._started = True
    return True
