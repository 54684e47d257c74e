"""What vol.* writes to devices: GPT partitions, filesystems, MD and btrfs RAID.

Every function here is given devices den.node.vol_guard has already let through.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import struct
from typing import Any

from den import proc
from den.errors import BackendFailure, InvalidParams
from den.node import vol_sys

MKFS = {
    "btrfs": ["mkfs.btrfs", "-f", "-q"],
    "ext4": ["mkfs.ext4", "-F", "-q"],
    "vfat": ["mkfs.vfat"],
    "swap": ["mkswap", "-f"],
}
LABEL_MAX = {"btrfs": 255, "ext4": 16, "vfat": 11, "swap": 15}


async def _wait_node(path: str, timeout: float = 5.0) -> None:
    """A new partition's node: devtmpfs makes it, but not always at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not os.path.exists(path):
        if loop.time() > deadline:
            raise BackendFailure(f"{path} did not appear after the partition table was written")
        await asyncio.sleep(0.05)


async def create_partition(
    name: str, size_bytes: int | None, type_code: str, label: str, wipe: bool
) -> dict[str, Any]:
    """A GPT partition in the first free gap big enough: a new table when the disk has none
    (or ``wipe``), else added to the existing GPT."""
    has_table = bool(vol_sys.partitions_of(name))
    gaps = vol_sys.free_space(name, blank=wipe)
    if not any(size_bytes is None or g["size_bytes"] >= size_bytes for g in gaps):
        biggest = max((g["size_bytes"] for g in gaps), default=0)
        raise InvalidParams(
            f"no free space of that size on /dev/{name} (the largest gap is {biggest} bytes)",
            field="size_bytes",
        )
    before = set(vol_sys.partitions_of(name))
    if wipe:
        # Every signature (an MBR, a filesystem) goes: a leftover one would make
        # the disk ambiguous to blkid and the kernel.
        await proc.run(["wipefs", "--all", "--quiet", f"/dev/{name}"], timeout=60)
    argv = ["sgdisk"]
    if wipe or not has_table:
        argv += ["--clear"]
    end = f"+{size_bytes // 1024}K" if size_bytes is not None else "0"
    argv += ["--new", f"0:0:{end}", "--typecode", f"0:{type_code}"]
    if label:
        argv += ["--change-name", f"0:{label}"]
    await proc.run([*argv, f"/dev/{name}"], timeout=60)
    await sync_kernel(name)
    after = set(vol_sys.partitions_of(name))
    new = sorted(after - before)
    if not new:
        raise BackendFailure(
            f"the partition was written but the kernel shows none on /dev/{name} "
            "(a loop device needs `losetup -P`)"
        )
    part = vol_sys.partition(new[-1])
    await _wait_node(part.path)
    return {
        "device": f"/dev/{name}",
        "partition": part.path,
        "number": part.number,
        "start_bytes": part.start_bytes,
        "size_bytes": part.size_bytes,
        "type_code": type_code,
        "label": label,
    }


# BLKPG: tell the kernel about one partition (linux/blkpg.h)
_BLKPG = 0x1269
_BLKPG_ADD, _BLKPG_DEL = 1, 2


def _blkpg(name: str, op: int, number: int, start: int = 0, length: int = 0) -> None:
    part = ctypes.create_string_buffer(struct.pack("@qqi64s64s", start, length, number, b"", b""))
    arg = bytearray(struct.pack("@iiiP", op, 0, ctypes.sizeof(part), ctypes.addressof(part)))
    fd = os.open(f"/dev/{name}", os.O_RDONLY)
    try:
        fcntl.ioctl(fd, _BLKPG, arg)
    finally:
        os.close(fd)


async def sync_kernel(name: str) -> None:
    """Make the kernel's partitions of a disk those of its table.

    sgdisk asks the kernel to re-read the table, but a kernel built without the
    GPT parser (some VM kernels) sees none: den adds them itself (BLKPG), from
    the table as libblkid reads it (partx --show).
    """
    res = await proc.run(
        ["partx", "--show", "--noheadings", "--output", "NR,START,SECTORS", f"/dev/{name}"],
        check=False,
        timeout=30,
    )
    table = {}
    for line in res.stdout.splitlines():
        nr, start, sectors = (int(x) for x in line.split())
        table[nr] = (start * vol_sys.SECTOR, sectors * vol_sys.SECTOR)
    parts = map(vol_sys.partition, vol_sys.partitions_of(name))
    kernel = {p.number: (p.start_bytes, p.size_bytes) for p in parts}
    try:
        for nr, have in kernel.items():
            if table.get(nr) != have:
                _blkpg(name, _BLKPG_DEL, nr)
        for nr, want in table.items():
            if kernel.get(nr) != want:
                _blkpg(name, _BLKPG_ADD, nr, *want)
    except OSError as exc:
        raise BackendFailure(
            f"cannot update the kernel's partitions of /dev/{name}: {exc}"
        ) from None


async def uuid_of(path: str) -> str:
    return (await vol_sys.blkid(path)).get(path, {}).get("UUID", "")


async def create_filesystem(name: str, fstype: str, label: str) -> dict[str, Any]:
    if len(label) > LABEL_MAX[fstype]:
        raise InvalidParams(f"at most {LABEL_MAX[fstype]} characters for {fstype}", field="label")
    path = f"/dev/{name}"
    argv = [*MKFS[fstype]]
    if label:
        argv += ["-n" if fstype == "vfat" else "-L", label]
    await proc.run([*argv, path], timeout=600)
    return {"device": path, "fstype": fstype, "label": label, "uuid": await uuid_of(path)}


async def create_md_array(name: str, members: list[str]) -> dict[str, Any]:
    missing = vol_sys.md_missing()
    if missing:
        # mdadm would leave device nodes behind before failing
        raise BackendFailure(f"{missing}; no array made")
    dev = f"/dev/md/{name}"
    if os.path.exists(dev):
        raise InvalidParams(f"an MD array named {name} exists already", field="name")
    await proc.run(
        [
            "mdadm", "--create", dev, "--run", "--level=1", "--metadata=1.2",
            f"--raid-devices={len(members)}", "--homehost=any", f"--name={name}",
            *(f"/dev/{m}" for m in members),
        ],
        timeout=120,
    )  # fmt: skip
    real = os.path.realpath(dev)
    return {"name": name, "device": dev, "path": real, "members": [f"/dev/{m}" for m in members]}


async def stop_md_array(name: str, zero_superblock: bool) -> dict[str, Any]:
    members = vol_sys.slaves(name)
    await proc.run(["mdadm", "--stop", f"/dev/{name}"], timeout=60)
    if zero_superblock:
        for m in members:
            await proc.run(["mdadm", "--zero-superblock", f"/dev/{m}"], timeout=60)
    return {"device": f"/dev/{name}", "members": [f"/dev/{m}" for m in members], "stopped": True}


async def md_detail(name: str) -> dict[str, Any]:
    res = await proc.run(["mdadm", "--detail", "--export", f"/dev/{name}"], timeout=30)
    detail = dict(ln.split("=", 1) for ln in res.stdout.splitlines() if "=" in ln)
    info = next((a for a in vol_sys.mdstat() if a["name"] == name), {})
    return {**info, "detail": detail}


async def create_btrfs_raid(
    members: list[str], profile: str, metadata: str, label: str
) -> dict[str, Any]:
    paths = [f"/dev/{m}" for m in members]
    argv = ["mkfs.btrfs", "-f", "-q", "-d", profile, "-m", metadata]
    if label:
        argv += ["-L", label]
    await proc.run([*argv, *paths], timeout=600)
    # Register every member with the kernel so that mounting any one finds the rest.
    await proc.run(["btrfs", "device", "scan", *paths], timeout=60)
    return {
        "devices": paths,
        "data_profile": profile,
        "metadata_profile": metadata,
        "label": label,
        "uuid": await uuid_of(paths[0]),
    }


async def resize_max(mount: vol_sys.Mount) -> dict[str, Any]:
    if mount.fstype == "btrfs":
        await proc.run(["btrfs", "filesystem", "resize", "max", mount.mount_point], timeout=600)
    elif mount.fstype in ("ext4", "ext3", "ext2"):
        await proc.run(["resize2fs", mount.source], timeout=600)
    else:
        raise InvalidParams(
            f"{mount.mount_point} is {mount.fstype}: only btrfs and ext4 grow", field="path"
        )
    st = os.statvfs(mount.mount_point)
    return {
        "path": mount.mount_point,
        "fstype": mount.fstype,
        "size_bytes": st.f_blocks * st.f_frsize,
    }
