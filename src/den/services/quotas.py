"""Limits of workspaces: sizes, sane resources, per-user quotas, disk limits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from den.db.models import User, Workspace
from den.errors import BackendFailure, InvalidParams, QuotaExceeded
from den.rpc.registry import Context

if TYPE_CHECKING:
    from den.app import App

SIZE_RE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?)\s*([KMGT]?)i?B?", re.I)
MAX_MIB = 1 << 30  # 1 PiB: past any disk, and far inside a 64-bit byte count


def parse_mib(text: str, field: str) -> int:
    """A size like 512M, 2G, 1.5G or a number of MiB -> MiB."""
    m = SIZE_RE.fullmatch(text.strip())
    if not m:
        raise InvalidParams(f"{text[:40]!r} is not a size like 512M or 2G", field=field)
    value, unit = float(m.group(1)), m.group(2).upper()
    factor = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    mib = int(value * factor)
    if mib > MAX_MIB:
        raise InvalidParams(f"{text[:40]!r} is more than the limit of 1024T (1 PiB)", field=field)
    return mib


def host_memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


_owner_locks: weakref.WeakKeyDictionary[App, dict[int, asyncio.Lock]] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def owner_lock(ctx: Context, owner: User) -> AsyncIterator[None]:
    """Serialise one owner's creates, clones and resizes from quota check to commit.

    Without it, two calls both pass :func:`check_quota` before either row is
    written, and together exceed the quota. Hold it around the check and the
    commit of the row, never around host work. The lock lives in this
    process, which is right for one node; a fleet of daemons sharing one
    PostgreSQL will need a row lock on the owner (``SELECT ... FOR UPDATE``)
    in the same place.
    """
    locks = _owner_locks.setdefault(ctx.app, {})
    lock = locks.setdefault(owner.id, asyncio.Lock())
    async with lock:
        yield


async def check_quota(
    ctx: Context,
    owner: User,
    cpu: float,
    memory_mb: int,
    disk_mb: int | None = None,
    exclude: str | None = None,
) -> None:
    """Refuse what would pass one of the owner's quotas, naming the limit and the use."""
    q = select(
        func.count(Workspace.id),
        func.coalesce(func.sum(Workspace.cpu), 0),
        func.coalesce(func.sum(Workspace.memory_mb), 0),
        func.coalesce(func.sum(Workspace.disk_mb), 0),
    ).where(Workspace.user_id == owner.id)
    if exclude is not None:
        q = q.where(Workspace.id != exclude)
    count, cpu_used, mem_used, disk_used = (await ctx.db.execute(q)).one()
    if exclude is None and owner.max_workspaces is not None and count + 1 > owner.max_workspaces:
        raise QuotaExceeded(
            f"quota max_workspaces is {owner.max_workspaces} and {owner.name} has {count} workspaces"
        )
    if owner.max_cpu is not None and float(cpu_used) + cpu > owner.max_cpu:
        raise QuotaExceeded(
            f"quota max_cpu is {owner.max_cpu}: {owner.name}'s other workspaces use "
            f"{float(cpu_used):g} CPUs and this one asks for {cpu:g}"
        )
    if owner.max_memory_mb is not None and int(mem_used) + memory_mb > owner.max_memory_mb:
        raise QuotaExceeded(
            f"quota max_memory_mb is {owner.max_memory_mb}: {owner.name}'s other workspaces use "
            f"{int(mem_used)} MiB and this one asks for {memory_mb} MiB"
        )
    if owner.max_disk_mb is not None:
        if disk_mb is None:
            raise QuotaExceeded(
                f"{owner.name} has a disk quota (max_disk_mb {owner.max_disk_mb}): give the "
                "workspace a disk size (--disk)"
            )
        if int(disk_used or 0) + disk_mb > owner.max_disk_mb:
            raise QuotaExceeded(
                f"quota max_disk_mb is {owner.max_disk_mb}: {owner.name}'s other workspaces use "
                f"{int(disk_used or 0)} MiB and this one asks for {disk_mb} MiB"
            )


def check_resources(cpu: float, memory_mb: int, pids: int) -> None:
    ncpu = os.cpu_count() or 1
    if not 0.05 <= cpu <= ncpu:
        raise InvalidParams(f"cpu must be between 0.05 and {ncpu} (this host's CPUs)", field="cpu")
    total = host_memory_mib()
    if not 32 <= memory_mb <= total:
        raise InvalidParams(
            f"memory must be between 32M and {total}M (this host's memory)", field="mem"
        )
    if not 16 <= pids <= 4_194_304:
        raise InvalidParams("pids must be between 16 and 4194304", field="pids")


def default_disk(ctx: Context) -> str | None:
    """The disk limit of a new workspace given none: every one gets one while
    disk_quota is on (the default)."""
    s = ctx.app.settings
    return s.default_disk if s.disk_quota else None


def parse_disk(ctx: Context, disk: str | None) -> int | None:
    if disk is None:
        return None
    if not ctx.app.settings.disk_quota:
        raise InvalidParams(
            "disk limits are off on this server (disk_quota = false in den.toml)", field="disk"
        )
    if not ctx.app.pool.quotas():
        # Refused rather than run unlimited: disk limits are on, so a workspace
        # without one would be the escape they exist to prevent.
        why = (
            "the pool is not btrfs (overlay driver)"
            if ctx.app.pool.driver != "btrfs"
            else "btrfs simple quotas are not on in the pool"
        )
        raise BackendFailure(
            f"disk limits are on (disk_quota = true) but {why}: run `den init` (btrfs and "
            "Linux 6.7 or newer), or set disk_quota = false to run workspaces without disk limits"
        )
    disk_mb = parse_mib(disk, "disk")
    if disk_mb < 64:
        raise InvalidParams("a disk limit is at least 64M", field="disk")
    return disk_mb


async def apply_disk_limit(ctx: Context, ws: Workspace) -> None:
    """Limit what the workspace's snapshots, and any subvolume made inside them, hold
    together (its level-1 btrfs qgroup; see den.storage.btrfs)."""
    if ws.disk_mb is None:
        return
    await ctx.app.pool.limit_volume(ws.id, ws.disk_mb << 20)
