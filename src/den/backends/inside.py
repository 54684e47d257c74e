"""Users and small files inside a workspace, read from its root filesystem on the host.

Backend-neutral: every backend keeps the workspace's rootfs on the host (the
sandbox as an idmapped snapshot, the microVM as the snapshot it shares), and
den resolves users there, never by asking the workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from den.errors import BackendFailure, Conflict, InvalidParams

# A workspace controls every byte of its rootfs: den reads from it only small
# regular files, through descriptors that follow no symlink and never wait.
READ_LIMIT = 1 << 20
READ_TIMEOUT = 5.0


class NotReadable(Exception):
    """A workspace file den will not read (not a regular file, or too large)."""


def read_inside(rootfs: Path, *parts: str, limit: int = READ_LIMIT) -> str:
    """Read a small regular file of a workspace's rootfs without following any symlink.

    The workspace owns its rootfs: a symlink there must not make den (root on
    the host) read a host file, and a FIFO or device must not make it wait
    (the open is O_PATH, then the same inode is reopened non-blocking only once
    fstat says it is a regular file). Raises OSError when a part is missing or
    a symlink, :class:`NotReadable` for anything else den will not read.
    """
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(rootfs, flags | os.O_PATH | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            # O_DIRECTORY: a FIFO or device on the way fails with ENOTDIR, unopened.
            nxt = os.open(part, flags | os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        path_fd = os.open(parts[-1], flags | os.O_PATH, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        st = os.fstat(path_fd)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "a symlink", "/".join(parts))
        if not stat.S_ISREG(st.st_mode):
            raise NotReadable(f"/{'/'.join(parts)} is not a regular file")
        if st.st_size > limit:
            raise NotReadable(f"/{'/'.join(parts)} is larger than {limit >> 10} KiB")
        # Reopening through the O_PATH descriptor opens that very inode, whatever
        # the workspace renames meanwhile; O_NONBLOCK so that nothing can wait.
        file_fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    with os.fdopen(file_fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotReadable(f"/{'/'.join(parts)} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotReadable(f"/{'/'.join(parts)} is larger than {limit >> 10} KiB")
    return data.decode(errors="replace")


@dataclass(frozen=True)
class Account:
    """A user inside a workspace, from its /etc/passwd."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @property
    def ids(self) -> str:
        return f"{self.uid}:{self.gid}"


def _passwd_lines(rootfs: Path) -> list[str]:
    try:
        return read_inside(rootfs, "etc", "passwd").splitlines()
    except NotReadable as exc:
        raise Conflict(f"den cannot use the workspace's /etc/passwd: {exc}") from None
    except OSError:
        return []  # missing (or a symlink): only root, with its defaults


_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() takes "²"
# Linux ids are 32 bits and 2^32-1 is (uid_t)-1, "no change" to setresuid (crun
# takes it as -1 and runs as the overflow id): usable ids stop one below.
MAX_ID = (1 << 32) - 2


def valid_id(text: str) -> bool:
    """``text`` is a uid/gid den can run as: ASCII digits, 0..MAX_ID."""
    return bool(_ID.fullmatch(text)) and int(text) <= MAX_ID


def _find(lines: list[str], user: str) -> Account:
    for line in lines:
        f = line.split(":")
        if len(f) >= 6 and user in (f[0], f[2]) and _ID.fullmatch(f[2]) and _ID.fullmatch(f[3]):
            if not (valid_id(f[2]) and valid_id(f[3])):
                # the workspace's own file (its root writes it): a clear failure for
                # every exec as that user, never a number den cannot pass on
                raise BackendFailure(
                    f"the workspace's /etc/passwd has an invalid uid or gid for {f[0][:64]!r} "
                    f"(ids run from 0 to {MAX_ID})"
                )
            shell = f[6] if len(f) >= 7 and f[6] else "/bin/sh"
            return Account(f[0], int(f[2]), int(f[3]), f[5] or "/", shell)
    if user in ("", "root", "0"):
        return Account("root", 0, 0, "/root", "/bin/sh")
    raise InvalidParams(f"no user {user!r} in the workspace's /etc/passwd", field="user")


def account(rootfs: Path, user: str) -> Account:
    """The workspace's /etc/passwd entry of ``user`` (by name or uid; root needs none).

    Never waits on the workspace (see :func:`read_inside`); prefer
    :func:`load_account`, which also keeps the disk read off the event loop.
    """
    return _find(_passwd_lines(rootfs), user)


async def load_account(rootfs: Path, user: str, timeout: float = READ_TIMEOUT) -> Account:
    """:func:`account` in a thread, given up after ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(account, rootfs, user), timeout)
    except TimeoutError:
        raise Conflict(
            f"the workspace's /etc/passwd took longer than {timeout:g} s to read"
        ) from None


async def resolve_user(rootfs: Path, user: str) -> tuple[str, str]:
    """("uid:gid", home) for exec: a passwd entry, or a bare numeric uid."""
    if user in ("", "root", "0"):
        return "0:0", "/root"
    if user.isascii() and user.isdigit():
        if not valid_id(user):
            raise InvalidParams(f"uid {user[:20]} is out of range (0 to {MAX_ID})", field="user")
        try:
            acct = await load_account(rootfs, user)
        except InvalidParams:
            return f"{user}:{user}", "/"
        return acct.ids, acct.home
    acct = await load_account(rootfs, user)
    return acct.ids, acct.home


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
