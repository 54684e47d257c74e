"""What the kernel says about block devices and mounts: sysfs, udev's data,
/proc/self/mountinfo, /proc/mdstat, and blkid for what is on a device.

Everything here only reads; nothing here decides what den may change
(that is den.node.vol_guard).
"""

from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from den import proc

SYS_BLOCK = Path("/sys/class/block")
UDEV_DATA = Path("/run/udev/data")
SECTOR = 512  # sysfs counts sizes and offsets in 512-byte sectors, whatever the device's


# -- mounts ------------------------------------------------------------------------


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass
class Mount:
    id: int
    parent_id: int
    dev: str  # major:minor of the filesystem (anonymous on btrfs)
    root: str  # the directory of the filesystem mounted here (a btrfs subvolume)
    mount_point: str
    options: str
    propagation: list[str]
    fstype: str
    source: str
    super_options: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mountinfo() -> list[Mount]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(), right.split()
            out.append(
                Mount(
                    id=int(a[0]),
                    parent_id=int(a[1]),
                    dev=a[2],
                    root=_unescape(a[3]),
                    mount_point=_unescape(a[4]),
                    options=a[5],
                    propagation=a[6:],
                    fstype=b[0],
                    source=_unescape(b[1]) if len(b) > 1 else "",
                    super_options=b[2] if len(b) > 2 else "",
                )
            )
    return out


def mount_at(path: str, mounts: list[Mount] | None = None) -> Mount | None:
    """The mount whose mount point is exactly ``path`` (the last one mounted there)."""
    found = [m for m in (mounts if mounts is not None else mountinfo()) if m.mount_point == path]
    return found[-1] if found else None


def mount_holding(path: str, mounts: list[Mount] | None = None) -> Mount | None:
    """The mount that holds ``path`` (the deepest mount point above it)."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts if mounts is not None else mountinfo():
        mp = m.mount_point
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
            best is None or len(mp) >= len(best.mount_point)
        ):
            best = m
    return best


def swaps() -> list[str]:
    """Devices in use as swap (their kernel names)."""
    try:
        lines = Path("/proc/swaps").read_text().splitlines()[1:]
    except OSError:
        return []
    return [kernel_name(ln.split()[0]) or ln.split()[0] for ln in lines if ln.split()]


# -- block devices -------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def kernel_name(device: str) -> str:
    """The kernel's name (loop3, vda1, md127) of a device path; "" when it is no block device."""
    try:
        st = os.stat(device)
    except OSError:
        return ""
    if not stat.S_ISBLK(st.st_mode):
        return ""
    link = Path(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    try:
        return link.resolve().name
    except OSError:
        return ""


def name_of_dev(majmin: str) -> str:
    """The kernel name of the block device numbered ``major:minor`` ("" if none)."""
    link = Path(f"/sys/dev/block/{majmin}")
    return link.resolve().name if link.exists() else ""


def is_partition(name: str) -> bool:
    return (SYS_BLOCK / name / "partition").exists()


def parent_disk(name: str) -> str:
    """The whole disk a partition is on (the name itself for a disk)."""
    if not is_partition(name):
        return name
    return (SYS_BLOCK / name).resolve().parent.name


def partitions_of(name: str) -> list[str]:
    base = SYS_BLOCK / name
    return sorted(
        (p.name for p in (base.resolve()).iterdir() if (p / "partition").exists()),
        key=lambda n: int(_read(SYS_BLOCK / n / "partition") or 0),
    )


def slaves(name: str) -> list[str]:
    d = SYS_BLOCK / name / "slaves"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def holders(name: str) -> list[str]:
    d = SYS_BLOCK / name / "holders"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def size_bytes(name: str) -> int:
    return int(_read(SYS_BLOCK / name / "size") or 0) * SECTOR


def udev_props(name: str) -> dict[str, str]:
    """udev's properties of a device (E: lines of /run/udev/data/bMAJ:MIN), if udev runs."""
    majmin = _read(SYS_BLOCK / name / "dev")
    props: dict[str, str] = {}
    try:
        lines = (UDEV_DATA / f"b{majmin}").read_text().splitlines()
    except OSError:
        return props
    for ln in lines:
        if ln.startswith("E:") and "=" in ln:
            k, _, v = ln[2:].partition("=")
            props[k] = v
    return props


def _kind(name: str) -> str:
    for prefix, kind in (("loop", "loop"), ("md", "md"), ("dm-", "dm"), ("zram", "zram")):
        if name.startswith(prefix):
            return kind
    return "disk"


@dataclass
class Disk:
    name: str
    path: str
    kind: str
    size_bytes: int
    read_only: bool
    removable: bool
    rotational: bool
    model: str
    serial: str
    backing_file: str  # a loop device's image
    partitions: list[str] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)


def disks() -> list[Disk]:
    """Whole block devices with a size (an unattached loop device has none)."""
    out = []
    for d in sorted(Path("/sys/block").iterdir()):
        name = d.name
        size = size_bytes(name)
        if size == 0 or name.startswith("ram"):
            continue
        udev = udev_props(name)
        out.append(
            Disk(
                name=name,
                path=f"/dev/{name}",
                kind=_kind(name),
                size_bytes=size,
                read_only=_read(d / "ro") == "1",
                removable=_read(d / "removable") == "1",
                rotational=_read(d / "queue" / "rotational") == "1",
                model=udev.get("ID_MODEL", "") or _read(d / "device" / "model"),
                serial=udev.get("ID_SERIAL_SHORT", "") or _read(d / "device" / "serial"),
                backing_file=_read(d / "loop" / "backing_file"),
                partitions=partitions_of(name),
                holders=holders(name),
            )
        )
    return out


@dataclass
class Partition:
    name: str
    path: str
    disk: str
    number: int
    start_bytes: int
    size_bytes: int
    holders: list[str] = field(default_factory=list)


def partition(name: str) -> Partition:
    d = SYS_BLOCK / name
    return Partition(
        name=name,
        path=f"/dev/{name}",
        disk=parent_disk(name),
        number=int(_read(d / "partition") or 0),
        start_bytes=int(_read(d / "start") or 0) * SECTOR,
        size_bytes=size_bytes(name),
        holders=holders(name),
    )


def free_space(name: str, min_bytes: int = 1 << 20, blank: bool = False) -> list[dict[str, int]]:
    """Gaps between a disk's partitions (GPT: 1 MiB aligned start, 33 sectors of backup
    table at the end) of at least ``min_bytes``; ``blank``: as if it had none."""
    size = size_bytes(name)
    first, last = 1 << 20, size - 33 * SECTOR
    names = [] if blank else partitions_of(name)
    parts = sorted((p.start_bytes, p.start_bytes + p.size_bytes) for p in map(partition, names))
    out, pos = [], first
    for start, end in [*parts, (last, last)]:
        if start - pos >= min_bytes:
            out.append({"start_bytes": pos, "end_bytes": start, "size_bytes": start - pos})
        pos = max(pos, end)
    return out


# -- what a device holds -------------------------------------------------------------


async def blkid(device: str | None = None) -> dict[str, dict[str, str]]:
    """blkid's view, device path -> {TYPE, UUID, LABEL, PTTYPE...}.

    One device is probed directly (-p: no cache, the truth right now); without a
    device, every device blkid finds, skipping its cache (-c /dev/null) so that a
    filesystem made a moment ago shows.
    """
    argv = ["blkid", "-o", "export"]
    argv += ["-p", device] if device else ["-c", "/dev/null"]
    res = await proc.run(argv, check=False, timeout=30)
    out: dict[str, dict[str, str]] = {}
    cur: dict[str, str] = {}
    for line in (res.stdout + "\n").splitlines():
        if not line.strip():
            if cur:
                out[cur.get("DEVNAME", device or "")] = cur
            cur = {}
            continue
        k, _, v = line.partition("=")
        cur[k] = v
    if device and device not in out and out:
        out = {device: next(iter(out.values()))}
    return out


def mdstat() -> list[dict[str, Any]]:
    """MD arrays from sysfs: level, state, members, sync action, degraded."""
    out = []
    for d in sorted(Path("/sys/block").glob("md*")):
        md = d / "md"
        if not md.exists():
            continue
        name = d.name
        members = []
        for dev in sorted(md.glob("dev-*")):
            members.append(
                {
                    "name": dev.name.removeprefix("dev-"),
                    "path": f"/dev/{dev.name.removeprefix('dev-')}",
                    "state": _read(dev / "state"),
                    "slot": _read(dev / "slot"),
                }
            )
        out.append(
            {
                "name": name,
                "path": f"/dev/{name}",
                "level": _read(md / "level"),
                "raid_disks": int(_read(md / "raid_disks") or 0),
                "array_state": _read(md / "array_state"),
                "sync_action": _read(md / "sync_action"),
                "degraded": int(_read(md / "degraded") or 0),
                "metadata": _read(md / "metadata_version"),
                "uuid": _read(md / "uuid"),
                "size_bytes": size_bytes(name),
                "members": members,
            }
        )
    return out


def btrfs_filesystems() -> dict[str, list[str]]:
    """Mounted btrfs filesystems (the kernel lists them in sysfs): fsid -> device names."""
    root = Path("/sys/fs/btrfs")
    out: dict[str, list[str]] = {}
    if not root.exists():
        return out
    for fs in root.iterdir():
        devs = fs / "devices"
        if devs.is_dir():
            out[fs.name] = sorted(p.name for p in devs.iterdir())
    return out
