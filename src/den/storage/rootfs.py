"""Fix-ups that make a root filesystem fit to be snapshotted into many workspaces.

A rootfs may come from anywhere (an imported tarball), so every change here
is made through directory file descriptors opened with ``O_NOFOLLOW``: a
symlink such as ``etc/machine-id -> /etc/shadow`` inside the image can never
redirect a write to the host.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP)

RESOLV_CONF = "# den: every workspace gets its own resolver configuration here.\n"
HOSTS = (
    "127.0.0.1\tlocalhost\n"
    "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
    "ff02::1\t\tip6-allnodes\n"
    "ff02::2\t\tip6-allrouters\n"
)
SKEL_PROFILE = (
    "# ~/.profile: executed by login shells.\n"
    'if [ -n "$BASH_VERSION" ] && [ -f "$HOME/.bashrc" ]; then . "$HOME/.bashrc"; fi\n'
    'if [ -d "$HOME/.local/bin" ]; then PATH="$HOME/.local/bin:$PATH"; fi\n'
)


@contextlib.contextmanager
def _dir(root_fd: int, rel: str, *, create: bool = False) -> Iterator[int | None]:
    """A descriptor of ``rel`` under the root, never through a symlink; None if absent."""
    fd = os.dup(root_fd)
    try:
        for part in [p for p in rel.split("/") if p]:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in _MISSING:
                    raise
                log.debug("rootfs fix-up: %s is missing or not a directory; skipped", rel)
                os.close(fd)
                fd = -1
                yield None
                return
            os.close(fd)
            fd = nfd
        yield fd
    finally:
        if fd >= 0:
            os.close(fd)


def _unlink(dir_fd: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        log.warning("rootfs fix-up: %s is a directory; left alone", name)
        return
    os.unlink(name, dir_fd=dir_fd)


def _write(dir_fd: int, name: str, content: str, mode: int = 0o644) -> None:
    """Replace ``name`` (whatever it was, a symlink included) by a plain root-owned file."""
    _unlink(dir_fd, name)
    new_file(dir_fd, name, content, mode)


def new_file(dir_fd: int, name: str, content: str, mode: int = 0o644, owner: int = 0) -> None:
    """Create ``name`` (FileExistsError if anything is there, a symlink included),
    owned by ``owner`` (uid and gid) with exactly ``mode``."""
    fd = os.open(
        name,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        os.write(fd, content.encode())
        os.fchown(fd, owner, owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _read(dir_fd: int, name: str) -> str:
    # Non-blocking and no controlling tty: a FIFO or a device there is never waited on.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            return ""  # a device is never even opened
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        return os.read(fd, 65536).decode(errors="replace")
    finally:
        os.close(fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _empty_dir(dir_fd: int, keep: tuple[str, ...] = ()) -> None:
    """Remove the files (not subdirectories) directly in a directory."""
    for entry in os.scandir(dir_fd):
        if entry.name not in keep and not entry.is_dir(follow_symlinks=False):
            os.unlink(entry.name, dir_fd=dir_fd)


def looks_like_rootfs(root: Path) -> str:
    """Why ``root`` is not a root filesystem, or "" when it is one."""
    etc = root / "etc"
    if not etc.is_dir() or etc.is_symlink():
        return "it has no /etc directory"
    if not (root / "usr" / "bin").is_dir() and not os.path.lexists(root / "bin"):
        return "it has neither /usr/bin nor /bin"
    return ""


def fix_up(root: Path) -> None:
    """Strip per-machine identity from ``root`` and add what every workspace needs.

    No SSH host keys and an empty machine-id (each workspace makes its own), a
    C.UTF-8 locale, a placeholder resolv.conf and hostname, a user skeleton,
    and no apt caches.
    """
    root_fd = os.open(root, DIR_FLAGS)
    try:
        with _dir(root_fd, "etc/ssh") as fd:
            if fd is not None:
                for entry in os.scandir(fd):
                    if entry.name.startswith("ssh_host_"):
                        os.unlink(entry.name, dir_fd=fd)
        with _dir(root_fd, "etc") as etc:
            if etc is None:
                raise FileNotFoundError(errno.ENOENT, "no /etc in the root filesystem")
            _write(etc, "machine-id", "", 0o444)
            _write(etc, "resolv.conf", RESOLV_CONF)
            _write(etc, "hostname", "localhost\n")
            if not _read(etc, "hosts"):
                _write(etc, "hosts", HOSTS)
        with _dir(root_fd, "var/lib/dbus") as fd:
            if fd is not None:
                _unlink(fd, "machine-id")
        with _dir(root_fd, "etc/default", create=True) as fd:
            if fd is not None:
                old = [ln for ln in _read(fd, "locale").splitlines() if not ln.startswith("LANG=")]
                _write(fd, "locale", "\n".join(["LANG=C.UTF-8", *old]) + "\n")
        with _dir(root_fd, "etc/skel", create=True) as fd:
            if fd is not None and not _exists(fd, ".profile"):
                _write(fd, ".profile", SKEL_PROFILE)
        for rel, keep in (
            ("var/cache/apt", ()),
            ("var/cache/apt/archives", ("lock",)),
            ("var/cache/apt/archives/partial", ()),
            ("var/lib/apt/lists", ("lock",)),
            ("var/lib/apt/lists/partial", ()),
        ):
            with _dir(root_fd, rel) as fd:
                if fd is not None:
                    _empty_dir(fd, keep)
        _unlink(root_fd, ".dockerenv")
    finally:
        os.close(root_fd)
