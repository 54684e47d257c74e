"""Idmapped bind mounts: a workspace sees its snapshot owned by its own root.

Files stay owned by uid 0 on disk; the mount shows them as owned by the
workspace's subordinate range (0 -> START), so that root in the workspace's
user namespace owns its files without a chown walk: O(1) in the size of the
tree. Uses open_tree(2), mount_setattr(2) and move_mount(2) (Linux >= 5.12).

A map is a tuple of extents ``(first on-disk id, first host id, count)``, the
lines of the uid_map (and gid_map) of the user namespace the mount is
idmapped with: :func:`shifted` is the plain one, :func:`swapped` also trades
two ids (a workspace's /code: what den wrote as root is the owner's account's).
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import threading
import time
from pathlib import Path

from den.errors import BackendFailure
from den.storage import mounts

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_AT_FDCWD = -100
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_IDMAP = 0x100000


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


Extent = tuple[int, int, int]  # (first on-disk id, first host id, count)
Extents = tuple[Extent, ...]

_userns_cache: dict[Extents, int] = {}
_lock = threading.Lock()


def shifted(start: int, count: int) -> Extents:
    """On-disk ids 0..count shown as host ids start..start+count."""
    return ((0, start, count),)


def swapped(start: int, count: int, uid: int) -> Extents:
    """:func:`shifted`, but on-disk 0 shown as ``uid`` of the range and on-disk
    ``uid`` as its 0: a workspace's ``uid`` owns what is root's on disk, and what
    it writes is stored as root's."""
    if not 0 < uid < count:
        raise BackendFailure(f"uid {uid} is not within the owner's range of {count} ids")
    extents = (
        (0, start + uid, 1),
        (1, start + 1, uid - 1),
        (uid, start, 1),
        (uid + 1, start + uid + 1, count - uid - 1),
    )
    return tuple(e for e in extents if e[2] > 0)


def userns_fd(extents: Extents) -> int:
    """A user namespace with ``extents`` as its uid and gid map (cached fd: one
    per distinct map, so one per owner and kind of view, made once)."""
    with _lock:
        if extents in _userns_cache:
            return _userns_cache[extents]
        lines = "".join(f"{inside} {outside} {count}\n" for inside, outside, count in extents)
        # A short-lived process unshares a user namespace; we write its maps
        # and keep only a reference to the namespace.
        child = subprocess.Popen(["unshare", "--user", "sleep", "30"])
        try:
            own = os.readlink("/proc/self/ns/user")
            deadline = time.monotonic() + 5
            while os.readlink(f"/proc/{child.pid}/ns/user") == own:
                if time.monotonic() > deadline:
                    raise BackendFailure("could not create a user namespace for an idmapped mount")
                time.sleep(0.0005)
            for kind in ("uid_map", "gid_map"):
                # One write: the kernel takes a map only whole, and only once.
                with open(f"/proc/{child.pid}/{kind}", "w") as f:
                    f.write(lines)
            fd = os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            child.kill()
            child.wait()
        _userns_cache[extents] = fd
        return fd


def _check(ret: int, what: str, path: Path) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise BackendFailure(f"{what} of {path} failed: {os.strerror(err)}")


def idmapped_bind(src: Path, dst: Path, extents: Extents) -> None:
    """Mount ``src`` at ``dst`` with on-disk ids shown as host ids through ``extents``."""
    ns = userns_fd(extents)
    fd = _libc.syscall(
        _SYS_OPEN_TREE, _AT_FDCWD, str(src).encode(), _OPEN_TREE_CLONE | os.O_CLOEXEC
    )
    _check(fd, "open_tree", src)
    try:
        attr = _MountAttr(_MOUNT_ATTR_IDMAP, 0, 0, ns)
        ret = _libc.syscall(
            _SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)
        )
        if ret < 0 and ctypes.get_errno() == 22:  # EINVAL: the filesystem refuses idmapping
            raise BackendFailure(
                f"{src} cannot be idmapped on this kernel (overlayfs, for one, cannot): "
                "workspaces need their pool on btrfs; run `den init`"
            )
        _check(ret, "idmapping", src)
        ret = _libc.syscall(
            _SYS_MOVE_MOUNT, fd, b"", _AT_FDCWD, str(dst).encode(), _MOVE_MOUNT_F_EMPTY_PATH
        )
        _check(ret, "move_mount", dst)
    finally:
        os.close(fd)


def is_mountpoint(path: Path) -> bool:
    return mounts.is_mountpoint(path)


def unmount(path: Path) -> None:
    """Detach the mount at ``path`` (lazily); not mounted is fine."""
    if not is_mountpoint(path):
        return
    ret = _libc.umount2(str(path).encode(), 2)  # MNT_DETACH
    if ret < 0:
        err = ctypes.get_errno()
        if err not in (22, 2):  # EINVAL: not a mount; ENOENT
            raise BackendFailure(f"cannot unmount {path}: {os.strerror(err)}")
