"""btrfs subvolumes through libbtrfsutil, quotas and trim through their ioctls
(no subprocess per snapshot)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct
from pathlib import Path

from den.errors import BackendFailure

try:
    import btrfsutil
except ImportError:  # pragma: no cover - reported by `den init --check`
    btrfsutil = None


def available() -> bool:
    return btrfsutil is not None


def _need() -> None:
    if btrfsutil is None:
        raise BackendFailure("python3-btrfsutil is not installed; run `den init`")


def is_btrfs(path: Path) -> bool:
    """Whether ``path`` lies on a btrfs filesystem."""
    return fstype(path) == "btrfs"


def fstype(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    target = os.path.realpath(path)
    best, best_type = "", ""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4].replace("\\040", " ")
            fstype = right.split()[0]
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, best_type = mount_point, fstype
    return best_type


def is_subvolume(path: Path) -> bool:
    _need()
    try:
        return bool(btrfsutil.is_subvolume(str(path)))
    except btrfsutil.BtrfsUtilError:
        return False


def create_subvolume(path: Path) -> None:
    _need()
    try:
        btrfsutil.create_subvolume(str(path))
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail("create subvolume", path, exc) from None


def snapshot(src: Path, dst: Path, *, read_only: bool = False) -> None:
    """An O(1) copy-on-write snapshot of ``src`` at ``dst``."""
    _need()
    try:
        btrfsutil.create_snapshot(str(src), str(dst), read_only=read_only)
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail("snapshot", dst, exc) from None


def delete_subvolume(path: Path) -> None:
    """Delete a subvolume and any subvolumes nested in it. Missing is fine."""
    _need()
    if not path.exists():
        return
    try:
        btrfsutil.delete_subvolume(str(path), recursive=True)
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail("delete subvolume", path, exc) from None


def set_read_only(path: Path, read_only: bool = True) -> None:
    _need()
    try:
        btrfsutil.set_subvolume_read_only(str(path), read_only)
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail("set read-only", path, exc) from None


def is_read_only(path: Path) -> bool:
    _need()
    return bool(btrfsutil.get_subvolume_read_only(str(path)))


def subvolume_id(path: Path) -> int:
    _need()
    return int(btrfsutil.subvolume_id(str(path)))


# -- quotas ----------------------------------------------------------------------
#
# den uses *simple* quotas (squota, Linux 6.7+): an extent is charged to the
# subvolume that wrote it, for as long as it lives. Unlike full qgroups this
# needs no backref walk on every commit, so snapshots and deletes cost what they
# cost without quotas (bench/snapshot.py), and it charges exactly what a
# workspace added: the image's extents a snapshot shares stay the image's.
#
# Each workspace gets a level-1 qgroup (1/<workspace id>) holding its rootfs and
# code snapshots; the limit is on that group. In squota mode the kernel puts a
# subvolume created inside another into the parent qgroups of the one holding
# it, so a nested subvolume (or a snapshot made inside the workspace) is
# charged to the same group. Reflinks and hard links allocate no extent, so
# they are charged nothing and take no space; a sparse file is charged its
# written blocks only.

_MAGIC = 0x94
_QUOTA_CTL_ENABLE, _QUOTA_CTL_DISABLE, _QUOTA_CTL_ENABLE_SIMPLE = 1, 2, 4
_LIMIT_MAX_RFER, _LIMIT_MAX_EXCL = 1, 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_FS_INFO = _ioc(2, _MAGIC, 31, 1024)
_IOC_QUOTA_CTL = _ioc(3, _MAGIC, 40, 16)
_IOC_QGROUP_ASSIGN = _ioc(1, _MAGIC, 41, 24)
_IOC_QGROUP_CREATE = _ioc(1, _MAGIC, 42, 16)
_IOC_QGROUP_LIMIT = _ioc(2, _MAGIC, 43, 48)
_IOC_FITRIM = _ioc(3, ord("X"), 121, 24)


def _ioctl(path: Path, request: int, buf: bytearray) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, buf)
    finally:
        os.close(fd)


def _fsid(path: Path) -> str:
    buf = bytearray(1024)
    _ioctl(path, _IOC_FS_INFO, buf)
    raw = bytes(buf[16:32]).hex()
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


def quota_mode(pool: Path) -> str:
    """``squota``, ``qgroup`` (full accounting) or ``""`` (quotas off) on ``pool``."""
    try:
        mode = Path(f"/sys/fs/btrfs/{_fsid(pool)}/qgroups/mode").read_text().strip()
    except OSError:
        return ""
    return mode if mode in ("squota", "qgroup") else ""


def quota_enable(pool: Path) -> str:
    """Turn on simple quotas, else (before Linux 6.7) full qgroups; return the mode.

    Full qgroups left by an older den are switched over where simple quotas exist.
    """
    mode = quota_mode(pool)
    if mode == "squota":
        return mode
    try:
        if mode == "qgroup":
            _ioctl(pool, _IOC_QUOTA_CTL, bytearray(struct.pack("=QQ", _QUOTA_CTL_DISABLE, 0)))
        _ioctl(pool, _IOC_QUOTA_CTL, bytearray(struct.pack("=QQ", _QUOTA_CTL_ENABLE_SIMPLE, 0)))
        return "squota"
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY):
            raise BackendFailure(f"cannot enable btrfs quotas on {pool}: {exc}") from None
    # No simple quotas on this kernel (Debian 12's own is 6.1): full qgroups limit
    # as well, at the price of slower snapshot deletes (bench/snapshot.py). A nested
    # subvolume does not join its parent's group there; the seccomp profile's
    # refusal of the subvolume ioctls is what holds the limit.
    try:
        _ioctl(pool, _IOC_QUOTA_CTL, bytearray(struct.pack("=QQ", _QUOTA_CTL_ENABLE, 0)))
    except OSError as exc:
        raise BackendFailure(f"cannot enable btrfs quotas on {pool}: {exc}") from None
    return "qgroup"


def workspace_qgroup(vid: str) -> int:
    """The level-1 qgroup of workspace volume ``vid`` (its 48-bit id, or a hash of it)."""
    try:
        low = int(vid, 16) if len(vid) <= 12 else -1
    except ValueError:
        low = -1
    if low < 0:
        low = int.from_bytes(hashlib.sha256(vid.encode()).digest()[:6], "big")
    return (1 << 48) | low


def qgroup_name(qgroupid: int) -> str:
    return f"{qgroupid >> 48}/{qgroupid & ((1 << 48) - 1)}"


def qgroup_create(pool: Path, qgroupid: int) -> None:
    """Create a qgroup; one that exists is fine."""
    try:
        _ioctl(pool, _IOC_QGROUP_CREATE, bytearray(struct.pack("=QQ", 1, qgroupid)))
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise _fail(f"create qgroup {qgroup_name(qgroupid)} on", pool, exc) from None


def qgroup_destroy(pool: Path, qgroupid: int) -> bool:
    """Remove a qgroup; False while it still has members or usage (a missing one is gone)."""
    try:
        _ioctl(pool, _IOC_QGROUP_CREATE, bytearray(struct.pack("=QQ", 0, qgroupid)))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return True
        if exc.errno == errno.EBUSY:
            return False
        raise _fail(f"remove qgroup {qgroup_name(qgroupid)} on", pool, exc) from None
    return True


def qgroup_assign(pool: Path, subvol: Path, parent: int) -> None:
    """Make ``subvol``'s own qgroup a member of ``parent``; already one is fine."""
    child = subvolume_id(subvol)
    try:
        _ioctl(pool, _IOC_QGROUP_ASSIGN, bytearray(struct.pack("=QQQ", 1, child, parent)))
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise _fail(f"add to qgroup {qgroup_name(parent)}", subvol, exc) from None


def qgroup_limit(pool: Path, qgroupid: int, limit_bytes: int | None) -> None:
    """Limit what the members of ``qgroupid`` may hold together; None lifts it.

    Addressed by id on the pool root, so it also works on a group over its limit.
    """
    # Simple quotas: both limits, equal: squota charges an extent to one group only,
    # so what a group references is what it holds. Full qgroups: the exclusive
    # limit only, since what a group references includes the image's extents its
    # snapshots share. All ones is the kernel's "clear this limit".
    full = quota_mode(pool) == "qgroup"
    flags = _LIMIT_MAX_EXCL if full else _LIMIT_MAX_RFER | _LIMIT_MAX_EXCL
    value = (1 << 64) - 1 if limit_bytes is None else limit_bytes
    # btrfs_ioctl_qgroup_limit_args: qgroupid, then flags, max_rfer, max_excl, rsv_rfer, rsv_excl.
    buf = bytearray(struct.pack("=6Q", qgroupid, flags, value, value, 0, 0))
    try:
        _ioctl(pool, _IOC_QGROUP_LIMIT, buf)
    except OSError as exc:
        raise _fail(f"limit qgroup {qgroup_name(qgroupid)} on", pool, exc) from None


def snapshot_into(src: Path, dst: Path, qgroupid: int) -> None:
    """A writable snapshot of ``src`` at ``dst`` whose qgroup joins ``qgroupid`` at once."""
    _need()
    inherit = btrfsutil.QgroupInherit()
    inherit.add_group(qgroupid)
    try:
        btrfsutil.create_snapshot(str(src), str(dst), qgroup_inherit=inherit)
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail("snapshot", dst, exc) from None


# -- giving space back -------------------------------------------------------------


def commit(pool: Path) -> None:
    """Commit the pool's transaction: deletions committed wake the cleaner, and what
    the cleaner freed is committed."""
    _need()
    btrfsutil.sync(str(pool))


def deletions_pending(pool: Path) -> bool:
    """Whether deleted subvolumes still wait for the cleaner to free their extents."""
    _need()
    return bool(btrfsutil.deleted_subvolumes(str(pool)))


def fitrim(pool: Path) -> int:
    """Discard the pool's free space (FITRIM): a loop-backed pool punches holes in its
    image file, giving the space back to the host. Returns the bytes trimmed."""
    buf = bytearray(struct.pack("=QQQ", 0, (1 << 64) - 1, 0))
    try:
        _ioctl(pool, _IOC_FITRIM, buf)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            return 0  # a device that cannot discard keeps its blocks; nothing to give back
        raise _fail("trim", pool, exc) from None
    return int(struct.unpack("=QQQ", buf)[1])


def _fail(what: str, path: Path, exc: Exception) -> BackendFailure:
    msg = str(exc)
    if "No space left" in msg or getattr(exc, "errno", None) == 28:
        return BackendFailure(
            f"the storage pool is full: cannot {what} {path.name}; free space or grow the pool"
        )
    return BackendFailure(f"cannot {what} {path}: {msg}")
