"""btrfs subvolumes through libbtrfsutil (ioctls, no subprocess per snapshot)."""

from __future__ import annotations

import os
from pathlib import Path

from den import proc
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


async def quota_enable(pool: Path) -> None:
    await proc.run(["btrfs", "quota", "enable", str(pool)])


async def qgroup_limit_exclusive(pool: Path, subvol: Path, limit_bytes: int | None) -> None:
    """Limit the space only ``subvol`` holds (its exclusive bytes); None lifts it.

    The qgroup is addressed by id on the pool root, which also works on a
    subvolume that is over its limit already.
    """
    qgroup = f"0/{subvolume_id(subvol)}"
    value = "none" if limit_bytes is None else str(limit_bytes)
    await proc.run(["btrfs", "qgroup", "limit", "-e", value, qgroup, str(pool)])


def _fail(what: str, path: Path, exc: Exception) -> BackendFailure:
    msg = str(exc)
    if "No space left" in msg or getattr(exc, "errno", None) == 28:
        return BackendFailure(
            f"the storage pool is full: cannot {what} {path.name}; free space or grow the pool"
        )
    return BackendFailure(f"cannot {what} {path}: {msg}")
