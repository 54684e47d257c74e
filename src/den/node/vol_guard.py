"""What vol.* may touch: parameter shapes, and the objects it refuses to change.

Protected, always: the host's root filesystem and the disk under it, den's
storage pool (its mount, its loop device and every device of its btrfs), and
mounts den did not make. Destructive calls also refuse a device in use (mounted,
swap, an MD or device-mapper member) and, unless ``force``, one that holds a
filesystem, a partition table or a RAID superblock.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from den.config import Settings
from den.errors import Conflict, Forbidden, InvalidParams
from den.node import vol_sys

_DEVICE = re.compile(r"^/dev/[A-Za-z0-9._:+-]+(/[A-Za-z0-9._:+-]+)*$")
_PATH_PART = re.compile(r"^[^\x00-\x1f/]+$")
MAX_PATH = 255


def check_device(v: str) -> str:
    if len(v) > 128 or not _DEVICE.match(v) or ".." in v.split("/"):
        raise ValueError("must be a device path under /dev/ (letters, digits and ._:+- only)")
    return v


def check_path(v: str) -> str:
    parts = v.split("/")[1:]
    if (
        not v.startswith("/")
        or len(v) > MAX_PATH
        or ".." in parts
        or "." in parts
        or (v != "/" and not all(_PATH_PART.match(p) for p in parts))
    ):
        raise ValueError(
            f"must be an absolute path of at most {MAX_PATH} characters, "
            "without '.', '..', '//' or control characters"
        )
    return v


Device = Annotated[str, AfterValidator(check_device)]
AbsPath = Annotated[str, AfterValidator(check_path)]


def block_device(device: str, field: str = "device") -> str:
    """The kernel name of ``device``; -32602 unless it is a block device under /dev."""
    real = os.path.realpath(device)
    name = vol_sys.kernel_name(real) if real.startswith("/dev/") else ""
    if not name:
        raise InvalidParams(f"{device} is not a block device under /dev", field=field)
    return name


def device_node(name: str) -> str:
    """The device node of kernel name ``name`` (/dev/loop3): what den hands to mount,
    never the caller's path (a udev link, by-label/by-partlabel, follows whatever
    filesystem or partition carries that label by the time mount runs)."""
    node = f"/dev/{name.replace('!', '/')}"
    if vol_sys.kernel_name(node) != name:
        raise Conflict(f"/dev has no node for {name}; try again")
    return node


def _den_dirs(settings: Settings) -> list[str]:
    return [os.path.realpath(settings.data_dir), os.path.realpath(settings.pool_dir)]


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def mount_point(settings: Settings, path: str, field: str = "mount_point") -> str:
    """``path`` if it lies strictly below one of vol_mount_roots, also once the symlinks
    of its existing part are followed; -32602 otherwise."""
    roots = [os.path.realpath(r) for r in settings.vol_mount_roots]
    # Follow the links of the part that exists: a link must not lead out of the root.
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    real = os.path.join(os.path.realpath(existing), os.path.relpath(path, existing))
    real = os.path.normpath(real)
    for den in _den_dirs(settings):
        if _within(real, den) or _within(den, real):
            raise Forbidden(f"{path} is protected: it holds or is inside den's data ({den})")
    for root in roots:
        if real.startswith(root.rstrip("/") + "/"):
            return real
    raise InvalidParams(
        f"{path} is not below an allowed root ({', '.join(map(str, settings.vol_mount_roots))}: "
        "the setting vol_mount_roots)",
        field=field,
    )


def check_point(
    settings: Settings, point: str, mounts: list[vol_sys.Mount], den_points: set[str]
) -> None:
    """Refuse a mount at ``point`` that would change a mount den did not make: one
    below it (hidden by the new mount) or the one holding it, unless that is a
    filesystem an allowed root lies on (/, a separate /srv) or den's own mount."""
    if vol_sys.mount_at(point, mounts) is not None:
        raise Conflict(f"something is mounted at {point} already")
    for m in mounts:
        if m.mount_point.startswith(point.rstrip("/") + "/"):
            owner = "den's" if m.mount_point in den_points else "not den's"
            raise Forbidden(
                f"{m.mount_point} ({m.source or m.fstype}, {owner}) is mounted below {point}: "
                "a mount there would hide it"
            )
    holder = vol_sys.mount_holding(point, mounts)
    if holder is None or holder.mount_point in den_points:
        return
    roots = [os.path.realpath(r) for r in settings.vol_mount_roots]
    if any(_within(point, r) and _within(r, holder.mount_point) for r in roots):
        return
    raise Forbidden(
        f"{point} is inside {holder.mount_point} ({holder.source or holder.fstype}), "
        "a mount den did not make: a mount there would change it"
    )


def _closure(names: set[str]) -> set[str]:
    """The devices under ``names``: their disks, and what they are built on (slaves)."""
    out: set[str] = set()
    todo = list(names)
    while todo:
        n = todo.pop()
        if not n or n in out:
            continue
        out.add(n)
        todo.append(vol_sys.parent_disk(n))
        todo.extend(vol_sys.slaves(n))
    return out


def devices_of_mount(m: vol_sys.Mount) -> set[str]:
    names = {vol_sys.name_of_dev(m.dev), vol_sys.kernel_name(m.source)} - {""}
    if m.fstype == "btrfs":
        # every device of a multi-device btrfs, not only the one mountinfo names
        for devs in vol_sys.btrfs_filesystems().values():
            if names & set(devs):
                names |= set(devs)
    return names


def protected(settings: Settings, mounts: list[vol_sys.Mount] | None = None) -> dict[str, str]:
    """Kernel device name -> why den refuses to change it."""
    mounts = mounts if mounts is not None else vol_sys.mountinfo()
    out: dict[str, str] = {}
    root = vol_sys.mount_at("/", mounts)
    if root is not None:
        for n in _closure(devices_of_mount(root)):
            out[n] = "the device of the host's root filesystem /"
    pool_names: set[str] = set()
    pool = vol_sys.mount_at(os.path.realpath(settings.pool_dir), mounts)
    if pool is not None:
        pool_names |= devices_of_mount(pool)
    # The image by identity, not by path: a loop on it through a hard link or a bind
    # mount is the pool's blocks all the same.
    try:
        st = os.stat(settings.pool_image)
        image = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    except OSError:
        image = None
    for name in os.listdir("/sys/block") if image else ():
        if not name.startswith("loop") or not vol_sys.backing_file(name):
            continue
        found = vol_sys.loop_backing_id(name)
        if found and (os.major(found[0]), os.minor(found[0]), found[1]) == image:
            pool_names.add(name)
    for n in _closure(pool_names):
        out.setdefault(n, f"den's storage pool ({settings.pool_dir})")
    return out


def refuse_protected(settings: Settings, name: str, device: str) -> None:
    why = protected(settings).get(name)
    if why:
        raise Forbidden(f"{device} is protected: it is {why}; den will not change it")


def in_use(name: str, mounts: list[vol_sys.Mount]) -> str:
    """How ``name`` (or a partition of it) is in use, "" when it is not."""
    names = {name, *vol_sys.partitions_of(name)}
    for m in mounts:
        if names & devices_of_mount(m):
            return f"mounted at {m.mount_point}"
    swap = names & set(vol_sys.swaps())
    if swap:
        return f"in use as swap ({', '.join(sorted(swap))})"
    for n in sorted(names):
        if vol_sys.holders(n):
            return f"part of {', '.join(vol_sys.holders(n))}"
    return ""


async def check_destructive(settings: Settings, device: str, force: bool) -> str:
    """Refuse to overwrite ``device`` unless it is free (and blank, or ``force``);
    returns its kernel name."""
    name = block_device(device)
    refuse_protected(settings, name, device)
    use = in_use(name, vol_sys.mountinfo())
    if use:
        raise Conflict(f"{device} is {use}; free it first (force does not override this)")
    if force:
        return name
    if vol_sys.partitions_of(name):
        raise Conflict(f"{device} holds a partition table; pass force=true to overwrite it")
    found = (await vol_sys.blkid(f"/dev/{name}")).get(f"/dev/{name}", {})
    what = found.get("PTTYPE") and f"a {found['PTTYPE']} partition table"
    what = what or (found.get("TYPE") and f"a {found['TYPE']} filesystem")
    if what:
        raise Conflict(f"{device} holds {what}; pass force=true to overwrite it")
    return name
