"""What the kernel says about block devices and mounts: sysfs, udev's data,
/proc/self/mountinfo, /proc/mdstat, and blkid for what is on a device.

Everything here only reads; nothing here decides what den may change
(that is den.node.vol_guard).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from den import proc

SYS_BLOCK = Path("/sys/class/block")
UDEV_DATA = Path("/run/udev/data")
SECTOR = 512  # sysfs counts sizes and offsets in 512-byte sectors, whatever the device's


# -- mounts ------------------------------------------------------------------------


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal
    if "\\" not in field:
        return field
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
        # by hand: dataclasses.asdict deep-copies field by field, ten times slower
        return {**self.__dict__, "propagation": list(self.propagation)}


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
    """The topmost mount whose mount point is exactly ``path`` (what a path lookup, and
    ``umount path``, reach): of mounts stacked there, the one no other sits on."""
    found = [m for m in (mounts if mounts is not None else mountinfo()) if m.mount_point == path]
    below = {m.parent_id for m in found}
    top = [m for m in found if m.id not in below]
    return (top or found)[-1] if found else None


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


def _read(path: Path | str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _link_name(link: str) -> str:
    """The last part of a sysfs symlink's target (one readlink, no walk)."""
    try:
        return os.path.basename(os.readlink(link))
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
    return _link_name(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")


def name_of_dev(majmin: str) -> str:
    """The kernel name of the block device numbered ``major:minor`` ("" if none)."""
    return _link_name(f"/sys/dev/block/{majmin}")


def is_partition(name: str) -> bool:
    return os.path.exists(f"{SYS_BLOCK}/{name}/partition")


def parent_disk(name: str) -> str:
    """The whole disk a partition is on (the name itself for a disk)."""
    if not is_partition(name):
        return name
    # /sys/class/block/vda1 -> ../../devices/.../vda/vda1
    try:
        return os.path.basename(os.path.dirname(os.readlink(f"{SYS_BLOCK}/{name}")))
    except OSError:
        return name


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def partitions_of(name: str) -> list[str]:
    base = f"{SYS_BLOCK}/{name}"
    # The kernel names a disk's partitions after it (vda1, loop3p1, nvme0n1p2):
    # only those of its sysfs entries can be one.
    found = [
        (int(_read(f"{base}/{e}/partition") or 0), e)
        for e in _listdir(base)
        if e.startswith(name) and e != name and os.path.exists(f"{base}/{e}/partition")
    ]
    return [e for _, e in sorted(found)]


def slaves(name: str) -> list[str]:
    return sorted(_listdir(f"{SYS_BLOCK}/{name}/slaves"))


def holders(name: str) -> list[str]:
    return sorted(_listdir(f"{SYS_BLOCK}/{name}/holders"))


def backing_file(name: str) -> str:
    """A loop device's image ("" for other devices and a detached loop)."""
    return _read(f"/sys/block/{name}/loop/backing_file")


# LOOP_GET_STATUS64 (linux/loop.h): struct loop_info64 starts with the backing
# file's lo_device and lo_inode (__u64 each); 232 bytes in all.
_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64_SIZE = 232


def loop_backing_id(name: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a loop device's image, whatever path it was attached by
    (a hard link, a bind mount, a name since removed); None for a detached loop."""
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        buf = bytearray(_LOOP_INFO64_SIZE)
        fcntl.ioctl(fd, _LOOP_GET_STATUS64, buf)
    except OSError:  # ENXIO: no file bound
        return None
    finally:
        os.close(fd)
    dev, ino = struct.unpack_from("=QQ", buf)
    return int(dev), int(ino)


def size_bytes(name: str) -> int:
    return int(_read(f"{SYS_BLOCK}/{name}/size") or 0) * SECTOR


def udev_props(name: str) -> dict[str, str]:
    """udev's properties of a device (E: lines of /run/udev/data/bMAJ:MIN), if udev runs."""
    props: dict[str, str] = {}
    if not UDEV_DATA.is_dir():  # no udev on this node
        return props
    majmin = _read(SYS_BLOCK / name / "dev")
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
    for name in sorted(_listdir("/sys/block")):
        size = size_bytes(name)
        if size == 0 or name.startswith("ram"):
            continue
        d = f"/sys/block/{name}"
        udev = udev_props(name)
        out.append(
            Disk(
                name=name,
                path=f"/dev/{name}",
                kind=_kind(name),
                size_bytes=size,
                read_only=_read(f"{d}/ro") == "1",
                removable=_read(f"{d}/removable") == "1",
                rotational=_read(f"{d}/queue/rotational") == "1",
                model=udev.get("ID_MODEL", "") or _read(f"{d}/device/model"),
                serial=udev.get("ID_SERIAL_SHORT", "") or _read(f"{d}/device/serial"),
                backing_file=backing_file(name),
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


def _parse_export(text: str, device: str | None = None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    cur: dict[str, str] = {}
    for line in (text + "\n").splitlines():
        if not line.strip():
            if cur:
                out[cur.get("DEVNAME", device or "")] = cur
            cur = {}
            continue
        k, _, v = line.partition("=")
        cur[k] = v
    return out


def _probe_key(name: str) -> tuple[Any, ...]:
    """What changes when anything is written to a device: the kernel's write and
    discard counters (a filesystem's own writes count too), the node's mtime
    (a write through /dev, before writeback), its size and disk sequence number
    (a loop device given another image)."""
    try:
        st = os.stat(f"/dev/{name}")
        node: tuple[int, ...] = (st.st_rdev, st.st_ino, st.st_mtime_ns)
    except OSError:
        node = ()
    io = _read(f"{SYS_BLOCK}/{name}/stat").split()
    # fields 5, 7, 12 and 14: writes completed, sectors written, discards, sectors discarded
    written = tuple(io[i] for i in (4, 6, 11, 13) if i < len(io))
    return node, written, _read(f"{SYS_BLOCK}/{name}/size"), _read(f"{SYS_BLOCK}/{name}/diskseq")


# What blkid found on each device (kernel name -> (_probe_key at the probe, fields)):
# a read asks blkid only about devices written to since it last looked.
_probes: dict[str, tuple[tuple[Any, ...], dict[str, str]]] = {}
_probe_lock = asyncio.Lock()


def forget_probes() -> None:
    """After den changed what is on a device: the next read asks blkid again."""
    _probes.clear()


def _probe_keys() -> dict[str, tuple[Any, ...]]:
    """Keys of the devices blkid looks at (/proc/partitions); a partition's includes
    its disk's, whose table gives it PARTUUID and PARTLABEL."""
    try:
        lines = Path("/proc/partitions").read_text().splitlines()[2:]
    except OSError:
        lines = []
    names = [ln.split()[3] for ln in lines if len(ln.split()) == 4]
    keys = {n: _probe_key(n) for n in names}
    for n in names:
        if (SYS_BLOCK / n / "partition").exists():
            keys[n] += keys.get(parent_disk(n), ())
    return keys


async def blkid(device: str | None = None) -> dict[str, dict[str, str]]:
    """blkid's view, device path -> {TYPE, UUID, LABEL, PTTYPE...}.

    One device is probed directly (-p: no cache, the truth right now); without a
    device, every device in /proc/partitions, skipping blkid's cache (-c /dev/null)
    and asking again only about devices written to since the last look (a
    filesystem made a moment ago shows).
    """
    if device:
        res = await proc.run(["blkid", "-o", "export", "-p", device], check=False, timeout=30)
        out = _parse_export(res.stdout, device)
        if device not in out and out:
            out = {device: next(iter(out.values()))}
        return out
    async with _probe_lock:
        keys = _probe_keys()
        stale = [n for n, k in keys.items() if n not in _probes or _probes[n][0] != k]
        if stale:
            argv = ["blkid", "-c", "/dev/null", "-o", "export", *(f"/dev/{n}" for n in stale)]
            found = _parse_export((await proc.run(argv, check=False, timeout=30)).stdout)
            for n in stale:
                _probes[n] = (keys[n], found.get(f"/dev/{n}", {}))
        for gone in _probes.keys() - keys.keys():
            del _probes[gone]
        return {f"/dev/{n}": dict(_probes[n][1]) for n in keys if _probes[n][1]}


def md_missing() -> str:
    """What keeps this kernel from MD RAID ("" when it has it)."""
    if os.path.exists("/proc/mdstat"):
        return ""
    release = os.uname().release
    why = f"this kernel ({release}) has no MD RAID: md and raid1 are not built in (CONFIG_MD, "
    why += "CONFIG_BLK_DEV_MD, CONFIG_MD_RAID1; no /proc/mdstat)"
    if not os.path.exists("/proc/modules"):
        return why + " and it loads no modules (CONFIG_MODULES is off: no /proc/modules)"
    modules = Path(f"/lib/modules/{release}/kernel/drivers/md")
    if not any(modules.glob("md-mod.ko*")):
        return why + f" and /lib/modules/{release} has no md-mod module"
    return why + " and md_mod is not loaded (modprobe md_mod raid1)"


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
