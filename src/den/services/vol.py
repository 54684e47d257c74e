"""vol.*: the node's storage (disks, partitions, filesystems, mounts, btrfs, MD RAID).

Reads need the read right, changes write, array creation admin (and the ACL's
grant for vol.*). The work is in den.node.vol_*; this module declares the
methods, checks their parameters and says which objects each call targets (the
audit log records the full target of every change).
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated, Any, Literal

from pydantic import Field

from den.errors import Conflict, Forbidden, InvalidParams
from den.node import vol_btrfs, vol_guard, vol_state, vol_sys, vol_write
from den.node.vol_guard import AbsPath, Device
from den.rpc.registry import Cli, Context, NoParams, Params, Right, method

MAX_BYTES = 1 << 50  # 1 PiB: more than any disk den would see; larger is a typo or an attack
Label = Annotated[str, Field(max_length=255, pattern=r"^[A-Za-z0-9._-]*$")]


# -- helpers ---------------------------------------------------------------------------


def _existing(path: str, field: str = "path") -> str:
    if not os.path.exists(path):
        raise InvalidParams(f"{path} does not exist", field=field)
    return path


async def _on_den_mount(ctx: Context, path: str, field: str = "path") -> vol_sys.Mount:
    """The mount holding ``path``, which must be one vol.mount made: den changes
    filesystems it mounted, never the host's or its own pool."""
    m = vol_sys.mount_holding(path)
    if m is None or m.mount_point not in await vol_state.recorded_points(ctx.db):
        where = m.mount_point if m is not None else "?"
        raise Forbidden(
            f"{path} is on {where}, a mount den did not make (vol.mount); den will not change it"
        )
    real = os.path.realpath(path)
    if real != path:
        raise InvalidParams(f"{path} leads through a symbolic link to {real}", field=field)
    return m


def _pool(ctx: Context) -> str:
    return str(ctx.app.settings.pool_dir)


# -- reads -----------------------------------------------------------------------------


class PathParams(Params):
    path: AbsPath = Field(description="An absolute path on a filesystem den mounted (vol.mount).")


class OptPathParams(Params):
    path: AbsPath | None = Field(
        None, description="An absolute path; omitted: den's storage pool (vol.usage: every mount)."
    )


class DeviceParams(Params):
    device: Device = Field(description="The MD array's device (/dev/md127, /dev/md/NAME).")


@method("vol.list_disks", right=Right.read, cli=Cli("vol disk ls"))
async def list_disks(ctx: Context, p: NoParams) -> list[dict[str, Any]]:
    """Whole block devices (disks, loop, MD), with size, partitions and holders."""
    prot = vol_guard.protected(ctx.app.settings)
    return [{**d.__dict__, "protected": prot.get(d.name, "")} for d in vol_sys.disks()]


@method("vol.list_partitions", right=Right.read, cli=Cli("vol partition ls"))
async def list_partitions(ctx: Context, p: NoParams) -> list[dict[str, Any]]:
    """Partitions of every disk, with the filesystem each holds (blkid)."""
    fs = await vol_sys.blkid()
    out = []
    for d in vol_sys.disks():
        for name in d.partitions:
            part = vol_sys.partition(name)
            info = fs.get(part.path, {})
            out.append(
                {**part.__dict__, "fstype": info.get("TYPE", ""), "uuid": info.get("UUID", ""),
                 "label": info.get("LABEL", ""), "part_label": info.get("PARTLABEL", "")}
            )  # fmt: skip
    return out


@method("vol.list_filesystems", right=Right.read, cli=Cli("vol fs ls"))
async def list_filesystems(ctx: Context, p: NoParams) -> list[dict[str, Any]]:
    """Filesystems (and swap, RAID members) found on block devices, and where each is mounted."""
    mounts = vol_sys.mountinfo()
    out = []
    for dev, info in sorted((await vol_sys.blkid()).items()):
        if "TYPE" not in info:
            continue
        name = vol_sys.kernel_name(dev)
        out.append(
            {
                "device": dev,
                "fstype": info["TYPE"],
                "uuid": info.get("UUID", ""),
                "label": info.get("LABEL", ""),
                "mount_points": [
                    m.mount_point
                    for m in mounts
                    if name and name in {vol_sys.kernel_name(m.source), vol_sys.name_of_dev(m.dev)}
                ],
            }
        )
    return out


@method("vol.list_mounts", right=Right.read, cli=Cli("vol mount ls"))
async def list_mounts(ctx: Context, p: NoParams) -> list[dict[str, Any]]:
    """Every mount (from /proc/self/mountinfo); ``managed``: den made it (vol.mount)."""
    ours = await vol_state.recorded_points(ctx.db)
    return [{**m.as_dict(), "managed": m.mount_point in ours} for m in vol_sys.mountinfo()]


@method("vol.list_subvolumes", right=Right.read, cli=Cli("vol subvolume ls"))
async def list_subvolumes(ctx: Context, p: OptPathParams) -> list[dict[str, Any]]:
    """btrfs subvolumes below ``path`` (default: den's storage pool)."""
    path = _existing(p.path or _pool(ctx))
    return await asyncio.to_thread(vol_btrfs.list_subvolumes, path)


class FreeSpaceParams(Params):
    device: Device = Field(description="The disk, under /dev.")
    min_bytes: int = Field(
        1 << 20, ge=0, le=MAX_BYTES, description="Smallest gap listed, in bytes."
    )


@method("vol.list_free_space", right=Right.read, cli=Cli("vol free"))
async def list_free_space(ctx: Context, p: FreeSpaceParams) -> list[dict[str, int]]:
    """Unpartitioned gaps on a disk (where vol.create_partition would put one)."""
    name = vol_guard.block_device(p.device)
    if vol_sys.is_partition(name):
        raise InvalidParams(f"{p.device} is a partition, not a disk", field="device")
    return vol_sys.free_space(name, p.min_bytes)


def _usage(path: str) -> dict[str, Any]:
    st = os.statvfs(path)
    total, free, avail = (st.f_blocks * st.f_frsize, st.f_bfree * st.f_frsize,
                          st.f_bavail * st.f_frsize)  # fmt: skip
    return {
        "path": path,
        "total_bytes": total,
        "used_bytes": total - free,
        "available_bytes": avail,
        "inodes": st.f_files,
        "inodes_free": st.f_ffree,
    }


@method("vol.usage", right=Right.read, cli=Cli("vol usage"))
async def usage(ctx: Context, p: OptPathParams) -> list[dict[str, Any]]:
    """Space used and free: of ``path``, or of every mounted block-device filesystem."""
    if p.path:
        return [_usage(_existing(p.path))]
    seen, out = set(), []
    for m in vol_sys.mountinfo():
        if m.source.startswith("/dev/") and m.dev not in seen:
            seen.add(m.dev)
            try:
                out.append({**_usage(m.mount_point), "device": m.source, "fstype": m.fstype})
            except OSError:
                continue  # a mount point this process cannot see
    return out


@method("vol.inventory", right=Right.read, cli=Cli("vol inventory"))
async def inventory(ctx: Context, p: NoParams) -> dict[str, Any]:
    """One snapshot of the node's storage: disks with their partitions, filesystems,
    mounts den made, MD arrays, btrfs filesystems, the pool and what is protected."""
    mounts = vol_sys.mountinfo()
    prot = vol_guard.protected(ctx.app.settings, mounts)
    fs = await vol_sys.blkid()
    disks = []
    for d in vol_sys.disks():
        disks.append(
            {
                **d.__dict__,
                "protected": prot.get(d.name, ""),
                "fstype": fs.get(d.path, {}).get("TYPE", ""),
                "partitions": [
                    {
                        **vol_sys.partition(n).__dict__,
                        "fstype": fs.get(f"/dev/{n}", {}).get("TYPE", ""),
                    }
                    for n in d.partitions
                ],
            }
        )
    return {
        "disks": disks,
        "filesystems": {dev: info for dev, info in fs.items() if "TYPE" in info},
        "managed_mounts": list((await vol_state.recorded(ctx.db)).values()),
        "md_arrays": vol_sys.mdstat(),
        "btrfs": vol_sys.btrfs_filesystems(),
        "pool": _pool(ctx),
        "protected": prot,
    }


@method("vol.fs_usage", right=Right.read, cli=Cli("vol fs usage"))
async def fs_usage(ctx: Context, p: OptPathParams) -> dict[str, Any]:
    """Detailed btrfs usage (`btrfs filesystem usage`) of ``path`` (default: the pool)."""
    return await vol_btrfs.fs_usage(_existing(p.path or _pool(ctx)))


@method("vol.fs_df", right=Right.read, cli=Cli("vol fs df"))
async def fs_df(ctx: Context, p: OptPathParams) -> list[dict[str, Any]]:
    """btrfs space per block group type and profile (`btrfs filesystem df`)."""
    return await vol_btrfs.fs_df(_existing(p.path or _pool(ctx)))


@method("vol.device_stats", right=Right.read, cli=Cli("vol fs stats"))
async def device_stats(ctx: Context, p: OptPathParams) -> dict[str, dict[str, int]]:
    """btrfs per-device error counters of the filesystem at ``path`` (default: the pool)."""
    return await vol_btrfs.device_stats(_existing(p.path or _pool(ctx)))


@method("vol.scrub_status", right=Right.read, cli=Cli("vol scrub status"))
async def scrub_status(ctx: Context, p: OptPathParams) -> dict[str, Any]:
    """The last or running btrfs scrub of ``path`` (default: the pool)."""
    return await vol_btrfs.scrub_status(_existing(p.path or _pool(ctx)))


@method("vol.balance_status", right=Right.read, cli=Cli("vol balance status"))
async def balance_status(ctx: Context, p: OptPathParams) -> dict[str, Any]:
    """Whether a btrfs balance runs on ``path`` (default: the pool)."""
    return await vol_btrfs.balance_status(_existing(p.path or _pool(ctx)))


@method("vol.list_md_arrays", right=Right.read, cli=Cli("vol md ls"))
async def list_md_arrays(ctx: Context, p: NoParams) -> list[dict[str, Any]]:
    """Linux MD (software RAID) arrays, from sysfs."""
    return vol_sys.mdstat()


def _md_name(device: str) -> str:
    name = vol_guard.block_device(device)
    if not (vol_sys.SYS_BLOCK / name / "md").exists():
        raise InvalidParams(f"{device} is not an MD array", field="device")
    return name


@method("vol.md_detail", right=Right.read, cli=Cli("vol md show"))
async def md_detail(ctx: Context, p: DeviceParams) -> dict[str, Any]:
    """One MD array: sysfs state and `mdadm --detail`."""
    return await vol_write.md_detail(_md_name(p.device))


@method("vol.verify", right=Right.read, cli=Cli("vol verify"))
async def verify(ctx: Context, p: NoParams) -> dict[str, Any]:
    """Drift between the mounts den recorded and the kernel's: not_mounted, other
    (something else mounted there), vanished (the filesystem is gone)."""
    return await vol_state.verify(ctx.db)


# -- writes ----------------------------------------------------------------------------


class PartitionParams(Params):
    device: Device = Field(description="The disk to partition, under /dev.")
    size_bytes: int | None = Field(None, ge=1 << 20, le=MAX_BYTES, description="None: the rest")
    type_code: str = Field("8300", pattern=r"^[0-9A-Fa-f]{4}$", description="sgdisk type code")
    label: str = Field(
        "", max_length=36, pattern=r"^[A-Za-z0-9._-]*$", description="GPT partition name"
    )
    force: bool = Field(False, description="the disk has a table or filesystem: add to it")


@method("vol.create_partition", right=Right.write, cli=Cli("vol partition add"))
async def create_partition(ctx: Context, p: PartitionParams) -> dict[str, Any]:
    """A GPT partition on a disk (a new table on a blank disk).

    A disk holding a partition table or filesystem needs force=true: the partition
    is then added to its GPT (another kind of table or a filesystem is replaced)."""
    ctx.target = f"device:{p.device}"
    name = await vol_guard.check_destructive(ctx.app.settings, p.device, p.force)
    if vol_sys.is_partition(name):
        raise InvalidParams(f"{p.device} is a partition, not a disk", field="device")
    found = (await vol_sys.blkid(f"/dev/{name}")).get(f"/dev/{name}", {})
    wipe = bool(found) and found.get("PTTYPE") != "gpt"
    try:
        return await vol_write.create_partition(
            name, p.size_bytes, p.type_code.upper(), p.label, wipe
        )
    finally:
        vol_sys.forget_probes()


class FilesystemParams(Params):
    device: Device = Field(description="The disk or partition to format, under /dev.")
    fstype: Literal["btrfs", "ext4", "vfat", "swap"] = Field(description="What to make.")
    label: Label = Field("", description="Filesystem label.")
    force: bool = Field(False, description="Format over an existing filesystem or table.")


@method("vol.create_filesystem", right=Right.write, cli=Cli("vol fs make"))
async def create_filesystem(ctx: Context, p: FilesystemParams) -> dict[str, Any]:
    """Format a device (btrfs, ext4, vfat or swap); force=true over an existing one."""
    ctx.target = f"device:{p.device} fstype:{p.fstype}"
    name = await vol_guard.check_destructive(ctx.app.settings, p.device, p.force)
    try:
        return await vol_write.create_filesystem(name, p.fstype, p.label)
    finally:
        vol_sys.forget_probes()  # the reads ask blkid again, not their last answer


class MountParams(Params):
    device: Device = Field(description="The block device to mount, under /dev.")
    mount_point: AbsPath = Field(description="Below one of vol_mount_roots; made if missing.")
    fstype: Literal["auto", "btrfs", "ext4", "vfat"] = Field("auto", description="auto: probed.")
    options: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list,
        max_length=16,
        description="Mount options (nosuid,nodev always; noexec unless exec).",
    )


@method("vol.mount", right=Right.write, cli=Cli("vol mount add"))
async def mount(ctx: Context, p: MountParams) -> dict[str, Any]:
    """Mount a filesystem below an allowed root (vol_mount_roots), always nosuid,nodev,
    noexec unless exec is asked; recorded, and mounted again when den starts."""
    ctx.target = f"mount:{p.device} -> {p.mount_point}"
    return await vol_state.mount(ctx.app.settings, ctx.db, ctx.caller.name, p.device,
                                 p.mount_point, p.fstype, p.options)  # fmt: skip


class UnmountParams(Params):
    mount_point: AbsPath = Field(description="A mount point den made (vol.mount).")


@method("vol.unmount", right=Right.write, cli=Cli("vol mount rm"))
async def unmount(ctx: Context, p: UnmountParams) -> dict[str, Any]:
    """Unmount a mount den made (vol.mount) and forget it; others are refused."""
    ctx.target = f"mount:{p.mount_point}"
    return await vol_state.unmount(ctx.app.settings, ctx.db, p.mount_point)


@method("vol.create_subvolume", right=Right.write, cli=Cli("vol subvolume add"))
async def create_subvolume(ctx: Context, p: PathParams) -> dict[str, Any]:
    """A btrfs subvolume at ``path`` on a filesystem den mounted."""
    ctx.target = f"subvolume:{p.path}"
    await _on_den_mount(ctx, p.path)
    return await asyncio.to_thread(vol_btrfs.create_subvolume, p.path)


class DeleteSubvolumeParams(Params):
    path: AbsPath = Field(description="The subvolume, on a btrfs den mounted.")
    recursive: bool = Field(False, description="Also the subvolumes nested in it.")


@method("vol.delete_subvolume", right=Right.write, cli=Cli("vol subvolume rm"))
async def delete_subvolume(ctx: Context, p: DeleteSubvolumeParams) -> dict[str, Any]:
    """Delete a btrfs subvolume (recursive: with the ones nested in it)."""
    ctx.target = f"subvolume:{p.path}"
    m = await _on_den_mount(ctx, p.path)
    if p.path == m.mount_point:
        raise InvalidParams("that is the mount point itself; vol.unmount it", field="path")
    return await asyncio.to_thread(vol_btrfs.delete_subvolume, p.path, p.recursive)


class SnapshotParams(Params):
    source: AbsPath = Field(description="The subvolume to snapshot, on a btrfs den mounted.")
    dest: AbsPath = Field(description="Path of the new snapshot, on the same filesystem.")
    read_only: bool = Field(False, description="Make the snapshot read-only.")


@method("vol.snapshot_subvolume", right=Right.write, cli=Cli("vol subvolume snapshot"))
async def snapshot_subvolume(ctx: Context, p: SnapshotParams) -> dict[str, Any]:
    """A snapshot of a subvolume, on the same filesystem den mounted."""
    ctx.target = f"subvolume:{p.source} -> {p.dest}"
    src = await _on_den_mount(ctx, p.source, "source")
    dst = await _on_den_mount(ctx, p.dest, "dest")
    if src.dev != dst.dev:
        raise InvalidParams("a snapshot stays on the filesystem of its source", field="dest")
    return await asyncio.to_thread(vol_btrfs.snapshot, p.source, p.dest, p.read_only)


class QuotaParams(Params):
    path: AbsPath = Field(description="The subvolume, on a btrfs den mounted.")
    limit_bytes: int | None = Field(..., ge=1 << 20, le=MAX_BYTES, description="None: no limit")


@method("vol.set_quota", right=Right.write, cli=Cli("vol subvolume quota"))
async def set_quota(ctx: Context, p: QuotaParams) -> dict[str, Any]:
    """Limit a subvolume's space (its qgroup; quotas are turned on if off)."""
    ctx.target = f"subvolume:{p.path}"
    await _on_den_mount(ctx, p.path)
    return await asyncio.to_thread(vol_btrfs.set_quota, p.path, p.limit_bytes)


@method("vol.scrub_start", right=Right.write, cli=Cli("vol scrub start"))
async def scrub_start(ctx: Context, p: PathParams) -> dict[str, Any]:
    """Start a btrfs scrub in the background (vol.scrub_status follows it)."""
    ctx.target = f"fs:{p.path}"
    await _on_den_mount(ctx, p.path)
    return await vol_btrfs.scrub_start(p.path)


class BalanceParams(Params):
    path: AbsPath = Field(description="A path on the btrfs den mounted to balance.")
    usage: int | None = Field(None, ge=0, le=100, description="only block groups under N% full")


@method("vol.balance_start", right=Right.write, cli=Cli("vol balance start"))
async def balance_start(ctx: Context, p: BalanceParams) -> dict[str, Any]:
    """Start a btrfs balance in the background (vol.balance_status follows it)."""
    ctx.target = f"fs:{p.path}"
    await _on_den_mount(ctx, p.path)
    return await vol_btrfs.balance_start(p.path, p.usage)


class DefragParams(Params):
    path: AbsPath = Field(description="A file or directory on a btrfs den mounted.")
    recursive: bool = Field(False, description="Also everything below a directory.")


@method("vol.defrag", right=Right.write, cli=Cli("vol defrag"))
async def defrag(ctx: Context, p: DefragParams) -> dict[str, Any]:
    """Defragment a file or directory on a btrfs den mounted."""
    ctx.target = f"fs:{p.path}"
    await _on_den_mount(ctx, _existing(p.path))
    return await vol_btrfs.defrag(p.path, p.recursive)


@method("vol.resize_max", right=Right.write, cli=Cli("vol fs grow"))
async def resize_max(ctx: Context, p: PathParams) -> dict[str, Any]:
    """Grow the filesystem mounted at ``path`` to its whole device (btrfs, ext4)."""
    ctx.target = f"fs:{p.path}"
    m = await _on_den_mount(ctx, p.path)
    return await vol_write.resize_max(m)


# -- admin: RAID -----------------------------------------------------------------------


Members = Annotated[list[Device], Field(min_length=2, max_length=8)]


async def _members(ctx: Context, devices: list[str], force: bool) -> list[str]:
    names = [await vol_guard.check_destructive(ctx.app.settings, d, force) for d in devices]
    if len(set(names)) != len(names):
        raise InvalidParams("the same device twice", field="devices")
    return names


class MdParams(Params):
    name: str = Field(..., pattern=r"^[a-z0-9_-]{1,32}$", description="The array is /dev/md/NAME.")
    devices: Members = Field(description="The member devices, under /dev.")
    force: bool = Field(False, description="Over members holding a filesystem or table.")


@method("vol.create_md_array", right=Right.admin, cli=Cli("vol md add"))
async def create_md_array(ctx: Context, p: MdParams) -> dict[str, Any]:
    """An MD RAID-1 array /dev/md/NAME of the devices (metadata 1.2)."""
    ctx.target = f"md:{p.name} <- {','.join(p.devices)}"
    names = await _members(ctx, p.devices, p.force)
    try:
        return await vol_write.create_md_array(p.name, names)
    finally:
        vol_sys.forget_probes()


class MdStopParams(Params):
    device: Device = Field(description="The MD array's device (/dev/md127, /dev/md/NAME).")
    zero_superblock: bool = Field(False, description="then erase the members' RAID superblocks")


@method("vol.stop_md_array", right=Right.admin, cli=Cli("vol md stop"))
async def stop_md_array(ctx: Context, p: MdStopParams) -> dict[str, Any]:
    """Stop an MD array (not mounted, not protected)."""
    ctx.target = f"md:{p.device}"
    name = _md_name(p.device)
    vol_guard.refuse_protected(ctx.app.settings, name, p.device)
    use = vol_guard.in_use(name, vol_sys.mountinfo())
    if use:
        raise Conflict(f"{p.device} is {use}; free it first")
    try:
        return await vol_write.stop_md_array(name, p.zero_superblock)
    finally:
        vol_sys.forget_probes()


Profile = Literal["raid1", "raid1c3", "raid1c4", "raid10", "raid0", "single"]


class BtrfsRaidParams(Params):
    devices: Members = Field(description="The member devices, under /dev.")
    profile: Profile = Field("raid1", description="Data profile.")
    metadata_profile: Profile | None = Field(None, description="default: the data profile")
    label: Label = Field("", description="Filesystem label.")
    force: bool = Field(False, description="Over members holding a filesystem or table.")


@method("vol.create_btrfs_raid", right=Right.admin, cli=Cli("vol raid add"))
async def create_btrfs_raid(ctx: Context, p: BtrfsRaidParams) -> dict[str, Any]:
    """One btrfs filesystem over several devices (RAID-1 by default)."""
    ctx.target = f"btrfs:{p.profile} <- {','.join(p.devices)}"
    names = await _members(ctx, p.devices, p.force)
    try:
        return await vol_write.create_btrfs_raid(
            names, p.profile, p.metadata_profile or p.profile, p.label
        )
    finally:
        vol_sys.forget_probes()
