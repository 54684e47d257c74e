"""Claiming a free instance number on this host (tests and benchmarks run side by side)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_DIR = Path("/run/den")


def claim(first: int, last: int, tag: str) -> tuple[int, int]:
    """An instance number in [first, last] that no other process holds.

    Returns (number, fd): the number stays claimed while the fd is open (flock).
    """
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for n in range(first, last + 1):
        fd = os.open(LOCK_DIR / f"{tag}-instance-{n}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return n, fd
    raise RuntimeError(f"no free instance number between {first} and {last}")
