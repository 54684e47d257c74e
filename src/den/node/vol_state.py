"""Mounts den makes: made and undone by vol.mount/vol.unmount, recorded in the
database (VolMount), restored when den starts, compared with the kernel by
vol.verify. A record whose filesystem vanished is pruned with an audit event."""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from den import proc
from den.db.models import AuditEvent, VolMount
from den.errors import Conflict, DenError, Forbidden, InvalidParams
from den.node import vol_guard, vol_sys

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App
    from den.config import Settings

log = logging.getLogger(__name__)

# Always on: nothing written to a volume is trusted on the host as root
# (no setuid programs, no device nodes); no programs run from it unless asked.
FORCED_OPTIONS = ("nosuid", "nodev")
_FLAG = re.compile(r"")
_NUMBER = re.compile(r"[0-9]{1,9}")
# Allowed options and the values each takes (a flag: the empty one). Left out on
# purpose: errors=panic (an I/O error on the volume would panic the node), nobarrier
# (trades the data's integrity for speed), dax, remount, and everything that
# changes ownership or access (suid, dev, uid=, gid=, context=...).
OPTIONS: dict[str, re.Pattern[str]] = {
    "ro": _FLAG,
    "rw": _FLAG,
    "noatime": _FLAG,
    "relatime": _FLAG,
    "nodiratime": _FLAG,
    "nosuid": _FLAG,
    "nodev": _FLAG,
    "noexec": _FLAG,
    "exec": _FLAG,
    "sync": _FLAG,
    "discard": re.compile(r"|async|sync"),
    "compress": re.compile(r"(zlib|lzo|zstd)(:[0-9]{1,2})?|no"),
    "compress-force": re.compile(r"(zlib|lzo|zstd)(:[0-9]{1,2})?"),
    "subvol": re.compile(r"/?[A-Za-z0-9._@+-]+(/[A-Za-z0-9._@+-]+)*"),
    "subvolid": _NUMBER,
    "space_cache": re.compile(r"|v1|v2"),
    "ssd": _FLAG,
    "nossd": _FLAG,
    "autodefrag": _FLAG,
    "degraded": _FLAG,
    "commit": _NUMBER,
    "errors": re.compile(r"remount-ro|continue"),
    "data": re.compile(r"ordered|journal|writeback"),
}


def check_options(options: list[str]) -> list[str]:
    for opt in options:
        key, eq, value = opt.partition("=")
        allowed = OPTIONS.get(key)
        if (
            allowed is None
            or len(opt) > 64
            or (eq and allowed is _FLAG)
            or not allowed.fullmatch(value)
            or ".." in value.split("/")
        ):
            raise InvalidParams(
                f"{opt[:64]!r} is not an allowed mount option: one of "
                f"{', '.join(sorted(OPTIONS))} (errors= only remount-ro or continue)",
                field="options",
            )
    forced = [*FORCED_OPTIONS, *(() if "exec" in options else ("noexec",))]
    return [*options, *(o for o in forced if o not in options)]


async def records(db: AsyncSession) -> list[VolMount]:
    return list((await db.scalars(select(VolMount).order_by(VolMount.id))).all())


# The mount points den recorded, kept in memory for vol.list_mounts (a read the
# tools poll): dropped whenever a call may change them, read again on next use.
_recorded: dict[str, dict[str, str]] | None = None


def forget_points() -> None:
    global _recorded
    _recorded = None


async def recorded(db: AsyncSession) -> dict[str, dict[str, str]]:
    """mount point -> {mount_point, device, fstype} of every mount den recorded (cached)."""
    global _recorded
    if _recorded is None:
        _recorded = {
            r.mount_point: {"mount_point": r.mount_point, "device": r.device, "fstype": r.fstype}
            for r in await records(db)
        }
    return _recorded


async def recorded_points(db: AsyncSession) -> set[str]:
    return set(await recorded(db))


def _mounted_from(m: vol_sys.Mount | None, device: str) -> bool:
    if m is None:
        return False
    want = vol_sys.kernel_name(device)
    # every member of a multi-device btrfs: mountinfo names only one of them
    return bool(want) and want in vol_guard.devices_of_mount(m)


async def mount(
    settings: Settings,
    db: AsyncSession,
    actor: str,
    device: str,
    mount_point: str,
    fstype: str,
    options: list[str],
) -> dict[str, Any]:
    point = vol_guard.mount_point(settings, mount_point)
    name = vol_guard.block_device(device)
    vol_guard.refuse_protected(settings, name, device)
    opts = check_options(options)
    ours = await recorded_points(db)
    vol_guard.check_point(settings, point, vol_sys.mountinfo(), ours)
    if point in ours:
        raise Conflict(f"den has a mount recorded at {point}; vol.unmount it first")
    node = vol_guard.device_node(name)
    found = (await vol_sys.blkid(node)).get(node, {})
    kind = found.get("TYPE", "")
    if fstype == "auto":
        fstype = kind
    if fstype not in ("btrfs", "ext4", "ext3", "ext2", "vfat"):
        raise InvalidParams(
            f"{device} holds {kind or 'no filesystem'}; vol.mount mounts btrfs, ext4 and vfat",
            field="fstype",
        )
    if fstype == "btrfs":
        # A multi-device btrfs mounts only once the kernel knows all of its members.
        await proc.run(["btrfs", "device", "scan"], check=False, timeout=60)
        # The scan takes a while: what was checked is checked again on the node den
        # mounts (the kernel name, not the caller's path).
        vol_guard.refuse_protected(settings, name, device)
        vol_guard.check_point(settings, point, vol_sys.mountinfo(), ours)
    os.makedirs(point, mode=0o755, exist_ok=True)
    await proc.run(["mount", "-t", fstype, "-o", ",".join(opts), node, point], timeout=120)
    rec = VolMount(
        mount_point=point,
        device=node,
        fstype=fstype,
        uuid=found.get("UUID", ""),
        options=",".join(opts),
        created_by=actor,
    )
    db.add(rec)
    await db.commit()  # now, so that the cache of recorded points is read after it
    forget_points()
    return {"device": node, "mount_point": point, "fstype": fstype, "options": opts,
            "uuid": rec.uuid}  # fmt: skip


async def unmount(settings: Settings, db: AsyncSession, mount_point: str) -> dict[str, Any]:
    point = os.path.normpath(mount_point)
    if point == "/":
        raise Forbidden("/ is protected: it is the host's root filesystem")
    pool = os.path.realpath(settings.pool_dir)
    if point == pool or point.startswith(pool + "/"):
        raise Forbidden(f"{point} is protected: it is den's storage pool ({settings.pool_dir})")
    rec = await db.scalar(select(VolMount).where(VolMount.mount_point == point))
    if rec is None:
        raise Forbidden(f"{point} was not mounted by den (vol.mount): vol.unmount refuses it")
    # umount takes the topmost mount at the point: it must be den's, not one
    # stacked over den's since.
    top = vol_sys.mount_at(point)
    if top is not None:
        if not _mounted_from(top, rec.device):
            raise Forbidden(
                f"{top.source or top.fstype} ({top.fstype}) is mounted over den's mount at "
                f"{point}; it is not den's: vol.unmount refuses it"
            )
        await proc.run(["umount", point], timeout=120)
    await db.delete(rec)
    await db.commit()
    forget_points()
    return {"mount_point": point, "device": rec.device, "unmounted": True}


async def _state(rec: VolMount, mounts: list[vol_sys.Mount]) -> str:
    """ok, not_mounted, other (something else is mounted there) or vanished."""
    m = vol_sys.mount_at(rec.mount_point, mounts)
    if _mounted_from(m, rec.device):
        return "ok"
    name = vol_sys.kernel_name(rec.device)
    if not name or vol_sys.size_bytes(name) == 0:
        return "vanished"
    if (
        rec.uuid
        and (await vol_sys.blkid(f"/dev/{name}")).get(f"/dev/{name}", {}).get("UUID") != rec.uuid
    ):
        return "vanished"  # the device name now holds another filesystem
    return "other" if m is not None else "not_mounted"


async def verify(db: AsyncSession) -> dict[str, Any]:
    mounts = vol_sys.mountinfo()
    entries = []
    for rec in await records(db):
        entries.append(
            {
                "mount_point": rec.mount_point,
                "device": rec.device,
                "fstype": rec.fstype,
                "state": await _state(rec, mounts),
            }
        )
    drift = [e for e in entries if e["state"] != "ok"]
    return {"ok": not drift, "drift": drift, "entries": entries}


async def restore(app: App) -> None:
    """At start: mount again what vol.mount recorded; prune what vanished. Never raises."""
    try:
        async with app.sessions() as db:
            mounts = vol_sys.mountinfo()
            recs = await records(db)
            for rec in recs:
                state = await _state(rec, mounts)
                where = f"mount:{rec.device} -> {rec.mount_point}"
                if state == "vanished":
                    log.warning("pruning a vanished mount", extra={"ctx": {"target": where}})
                    await db.delete(rec)
                    db.add(_prune_event(rec, where, "the filesystem vanished"))
                elif state == "not_mounted":
                    why = _recheck(app.settings, rec, mounts, {r.mount_point for r in recs})
                    if why:
                        log.warning("pruning a mount no longer allowed: %s", why,
                                    extra={"ctx": {"target": where}})  # fmt: skip
                        await db.delete(rec)
                        db.add(_prune_event(rec, where, f"no longer allowed: {why}"))
                    else:
                        await _remount(rec)
                elif state == "other":
                    log.warning("another filesystem is mounted where den recorded one",
                                extra={"ctx": {"target": where}})  # fmt: skip
            await db.commit()
    except Exception:
        log.exception("restoring vol mounts failed")
    finally:
        forget_points()


def _prune_event(rec: VolMount, where: str, reason: str) -> AuditEvent:
    return AuditEvent(
        actor="den",
        via="local",
        method="vol.prune",
        target=where[:200],
        params={"device": rec.device, "mount_point": rec.mount_point, "uuid": rec.uuid,
                "reason": reason[:500]},
        outcome="ok",
    )  # fmt: skip


def _recheck(
    settings: Settings, rec: VolMount, mounts: list[vol_sys.Mount], den_points: set[str]
) -> str:
    """vol.mount's checks again for a record about to be mounted at start: "" when they
    pass, else why not (the host changed under den: the point is a symlink now, a
    foreign mount is below or around it, the device is now the pool's)."""
    try:
        if vol_guard.mount_point(settings, rec.mount_point) != rec.mount_point:
            return f"{rec.mount_point} now leads elsewhere (a symbolic link)"
        vol_guard.check_point(settings, rec.mount_point, mounts, den_points - {rec.mount_point})
        name = vol_guard.block_device(rec.device)
        vol_guard.refuse_protected(settings, name, rec.device)
        check_options([o for o in rec.options.split(",") if o])
    except DenError as exc:
        return exc.message
    return ""


async def _remount(rec: VolMount) -> None:
    try:
        if rec.fstype == "btrfs":
            await proc.run(["btrfs", "device", "scan"], check=False, timeout=60)
        # The node of the kernel name, as vol.mount does (a record from before may
        # name a udev link).
        node = vol_guard.device_node(vol_guard.block_device(rec.device))
        os.makedirs(rec.mount_point, mode=0o755, exist_ok=True)
        await proc.run(["mount", "-t", rec.fstype, "-o", rec.options, node, rec.mount_point],
                       timeout=120)  # fmt: skip
        log.info("restored a mount", extra={"ctx": {"target": rec.mount_point}})
    except (DenError, OSError) as exc:
        log.warning("cannot restore a mount: %s", exc, extra={"ctx": {"target": rec.mount_point}})
