"""Claiming a free instance number on this host (tests and benchmarks run side by side)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_DIR = Path("/run/den")


def _lock_path(tag: str, n: int) -> Path:
    return LOCK_DIR / f"{tag}-instance-{n}.lock"


def claim(first: int, last: int, tag: str) -> tuple[int, int]:
    """An instance number in [first, last] that no other process holds.

    Returns (number, fd): the number stays claimed while the fd is open (flock);
    give it back with :func:`release`.
    """
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(first, last + 1):
        path = _lock_path(tag, n)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # The holder before us may have removed the file after we opened it:
        # the lock counts only if the path still names the file we locked.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        return n, fd
    raise RuntimeError(f"no free instance number between {first} and {last}")


def release(n: int, fd: int, tag: str) -> None:
    """Give a claimed number back, and remove its lock file."""
    _lock_path(tag, n).unlink(missing_ok=True)
    os.close(fd)
