"""What a workspace sees of the host besides its snapshots: sysfs, /etc files, init.

Each piece is a mount of its own on the host, in the workspace's private views
directory, so that the workspace's /proc/self/mountinfo names no host path (a
bind mount shows its path inside the source filesystem: a bind of
``DATA/bundles/ID/hosts`` would show exactly that) and its /sys shows only its
own network devices:

* ``sys``: a sysfs mounted from a thread that has joined the workspace's
  network namespace. sysfs tags /sys/class/net with the mounter's namespace,
  so the workspace sees lo and eth0, not the bridge or other tenants' veths
  and their counters. Root in the workspace could not mount it itself: the
  namespace belongs to the host's user namespace.
* ``etc``: a tiny tmpfs holding hostname, hosts and resolv.conf, written by
  den (never into the workspace's own /etc, which it controls).
* the instance's ``.init`` tmpfs: one copy of tini, shared by every workspace.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path

from den.errors import BackendFailure
from den.meta import BUSY_NAME, DEN_BUSY
from den.net import links
from den.storage import mounts

_libc = ctypes.CDLL(None, use_errno=True)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MNT_DETACH = 2
INIT_NAME = "init"


def _mount(source: str, target: Path, fstype: str, flags: int, data: str = "") -> None:
    ret = _libc.mount(
        source.encode(), str(target).encode(), fstype.encode(), flags, data.encode() or None
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise BackendFailure(f"cannot mount {fstype} at {target}: {os.strerror(err)}")


def unmount(target: Path, mounted: set[str] | None = None) -> None:
    """Detach whatever is mounted at ``target``, stacked mounts included.

    ``mounted``: the mount points as read from mountinfo by the caller (one read
    for many targets: mountinfo grows with every workspace).
    """
    path = os.path.realpath(target)
    if mounted is not None and path not in mounted:
        return
    while mounts.is_mountpoint(target):
        if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise BackendFailure(f"cannot unmount {target}: {os.strerror(err)}")
    if mounted is not None:
        mounted.discard(path)


def mount_sysfs(target: Path, netns: str, mounted: set[str]) -> None:
    """A read-only sysfs of the network namespace ``netns`` at ``target``.

    Always a fresh mount: a netns made again (after a reboot or a repair) must
    not leave the workspace looking at the old one.
    """
    target.mkdir(exist_ok=True, mode=0o755)
    unmount(target, mounted)

    def mount() -> None:
        # The thread is in the host's mount namespace: the mount lands there.
        _mount("sysfs", target, "sysfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)

    links.in_netns(netns, mount)


def write_etc(target: Path, files: dict[str, str], mounted: set[str]) -> None:
    """``files`` on a tmpfs of their own at ``target`` (mounted if it is not)."""
    target.mkdir(exist_ok=True, mode=0o755)
    if os.path.realpath(target) not in mounted:
        _mount("den", target, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=64k,mode=755")
    for name, text in files.items():
        tmp = target / f".{name}.tmp"
        tmp.write_text(text)
        tmp.chmod(0o644)
        tmp.replace(target / name)


def _holds(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


def ensure_init(target: Path, tini: Path) -> Path:
    """The instance's shared read-only copy of tini; returns its path."""
    init = target / INIT_NAME
    busy = target / BUSY_NAME  # den-busy (den.meta), mounted beside it
    target.mkdir(exist_ok=True, mode=0o755)
    # A den-busy of an older den is replaced (workspaces started before keep the
    # copy they have: a lazy unmount leaves their bind mounts alone).
    if mounts.is_mountpoint(target) and init.exists() and _holds(busy, DEN_BUSY):
        return init
    unmount(target)
    _mount("den", target, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=4m,mode=755")
    shutil.copyfile(tini, init)
    init.chmod(0o755)
    busy.write_text(DEN_BUSY)
    busy.chmod(0o755)
    _mount("den", target, "tmpfs", _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    return init
