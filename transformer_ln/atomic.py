"""Writes that a crash or ``kill -9`` can never leave half done: write a temporary sibling, then rename it.

``os.replace`` is atomic on POSIX file systems, so a reader (or a resumed run) sees the old file or the new one,
never a mix. Folders (checkpoints) go the same way through ``replace_dir``.

A write that fails for want of space (a full disk, a quota, the file-size limit of ``ulimit -f``) leaves nothing
behind and becomes ``OutOfSpace``, whose message is one line naming the path, the space the write needs and the
space free there (``no_space`` recognises it in ``OSError``s, in the Rust errors of safetensors and tokenizers, and in
torch's ``PytorchStreamWriter`` errors, which keep the ``OSError`` of a Python file object as their context).
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_SPACE_TEXT = {"no space left on device": errno.ENOSPC, "file too large": errno.EFBIG,
               "disk quota exceeded": errno.EDQUOT}
# torch's own file writer loses the errno: "unexpected pos 704 vs 598", "basic_ios::clear: iostream error",
# "file write failed"; these count as a lack of space only where the file system or the file-size limit says so
_WRITE_FAILED = ("unexpected pos", "iostream error", "file write failed")


class OutOfSpace(OSError):
    """A write that failed for want of space; ``str()`` is one line: the path, the space needed and free."""

    def __init__(self, code: int, message: str, path: Path):
        super().__init__(code, message)
        self.message, self.path = message, Path(path)

    def __str__(self) -> str:
        return self.message


def human(n: Optional[float]) -> str:
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: str | Path) -> Optional[int]:
    """Free space on the file system that holds ``path`` (or its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def file_size_limit() -> Optional[int]:
    """The soft ``RLIMIT_FSIZE`` (``ulimit -f``) in bytes, None when unlimited."""
    try:
        import resource
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def space_errno(exc: BaseException) -> Optional[int]:
    """ENOSPC, EFBIG or EDQUOT when ``exc`` (or an exception it was raised from) is a write that lacked space."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in SPACE_ERRNOS:
            return e.errno
        text = str(e).lower()
        m = re.search(r"os error (\d+)|\[errno (\d+)\]", text)
        code = int(m.group(1) or m.group(2)) if m else None
        if code in SPACE_ERRNOS:
            return code
        for words, code in _SPACE_TEXT.items():
            if words in text:
                return code
        todo += [e.__cause__, e.__context__]
    return None


def no_space(exc: BaseException, path: str | Path, needed: Optional[int] = None, then: str = "",
             at_least: bool = False) -> Optional[OutOfSpace]:
    """``exc`` as an ``OutOfSpace`` naming ``path`` (what was being written, ``needed`` bytes in all, or more than
    that with ``at_least``), or None when it is another error. ``then`` says what to do once space is freed."""
    code = space_errno(exc)
    free, limit = free_bytes(path), file_size_limit()
    if code is None and any(t in str(exc) for t in _WRITE_FAILED):
        if limit is not None and (needed is None or limit < needed + (64 << 10)):
            code = errno.EFBIG
        elif free is not None and needed is not None and free < needed + (1 << 20):
            code = errno.ENOSPC
    if code is None:
        return None
    if code == errno.EFBIG and limit is not None:
        why = f"over the file-size limit (ulimit -f) of {human(limit)}"
    elif code == errno.EFBIG:
        why = "a file too large for its file system"
    elif code == errno.EDQUOT:
        why = "disk quota exceeded"
    else:
        why = "no space left on the device"
    need = f"{'more than' if at_least else 'about'} {human(needed)}" if needed else "more space"
    if code == errno.EFBIG and limit is not None:  # not a full disk: the space free does not matter
        msg = f"cannot write {path}: {why}; it needs {need}; raise the limit (ulimit -f unlimited)"
    else:
        msg = f"cannot write {path}: {why}; it needs {need} free, {human(free)} free there now"
    return OutOfSpace(code, msg + (f"; {then}" if then else ""), Path(path))


def write_with(path: str | Path, write: Callable[[Path], None], size: Optional[int] = None) -> Path:
    """Call ``write(tmp)`` to produce the file under a temporary name, flush it to disk, rename it to ``path``.

    Lacking space, nothing is left behind and ``OutOfSpace`` says how much the file needs (``size``, or at least
    what was written when the space ran out).
    """
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        written = tmp.stat().st_size if tmp.exists() else None
        tmp.unlink(missing_ok=True)  # first, so the free space reported is what a retry would have
        full = no_space(e, path, size or written, at_least=not size)
        if full is None:
            raise
        raise full from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _tmp_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_text(path: str | Path, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` (UTF-8)."""
    data = text.encode("utf-8")
    return write_with(path, lambda tmp: tmp.write_bytes(data), size=len(data))


def tree_size(path: str | Path) -> int:
    """Bytes in the files under ``path`` (0 when it is gone; files vanishing meanwhile count as 0)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


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
