"""Writes that a crash or ``kill -9`` can never leave half done: write a temporary sibling, then rename it.

``os.replace`` is atomic on POSIX file systems, so a reader (or a resumed run) sees the old file or the new one,
never a mix. Folders (checkpoints) go the same way through ``replace_dir``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file under a temporary name, flush it to disk, rename it to ``path``."""
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder ``tmp`` to ``final``; ``final`` is always the old or the new folder, or (for the
    instant between two renames when replacing) absent with ``final.old`` complete."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
