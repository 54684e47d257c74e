"""Facts about a workspace read from its rootfs on the host, never following
a symlink the workspace could have planted."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from den.backends.sandbox import read_inside
from den.errors import InvalidParams


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @property
    def ids(self) -> str:
        return f"{self.uid}:{self.gid}"


def account(rootfs: Path, user: str) -> Account:
    """The workspace's /etc/passwd entry of ``user`` (root works without one)."""
    try:
        lines = read_inside(rootfs, "etc", "passwd").splitlines()
    except OSError:
        lines = []
    for line in lines:
        f = line.split(":")
        if len(f) >= 7 and (f[0] == user or f[2] == user) and f[2].isdigit() and f[3].isdigit():
            return Account(f[0], int(f[2]), int(f[3]), f[5] or "/", f[6] or "/bin/sh")
    if user in ("root", "0"):
        return Account("root", 0, 0, "/root", "/bin/sh")
    raise InvalidParams(f"no user {user!r} in the workspace's /etc/passwd", field="user")


def exists(rootfs: Path, rel: str) -> bool:
    """Whether ``rel`` exists in the rootfs with no symlink on the way (the last may be one)."""
    parts = [p for p in rel.split("/") if p]
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(rootfs, flags | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        for part in parts[:-1]:
            nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
