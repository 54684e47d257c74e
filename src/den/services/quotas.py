"""Limits of workspaces: sizes, sane resources, per-user quotas, disk limits."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
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


QUOTAS = ("max_workspaces", "max_cpu", "max_memory_mb", "max_disk_mb")
# A quota given as a share of the host: "50%" of its memory, "200%" of its CPUs.
SHARE_RE = re.compile(r"([0-9]{1,5})%")


def pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 32768  # the kernel's default


def workspace_pids_bound() -> int:
    """The most processes one workspace may be allowed: a quarter of the host's pid_max,
    so that no single workspace can take the pids every other process needs."""
    return pid_max() // 4


def user_pids_bound() -> int:
    """The most processes a member may give their workspaces together when raising a
    workspace's pids past default_pids: half of pid_max, so that one member filling
    all of theirs still leaves the host and the others room. (At the default, the
    workspace count bounds them: 10 x 1024 on a 32768 host.)"""
    return pid_max() // 2


def _default(text: str, whole: float, parse: Callable[[str], float]) -> int | None:
    """A default quota from the settings: -1 (none), a share of ``whole``, or a value."""
    text = text.strip()
    if text == "-1":
        return None
    m = SHARE_RE.fullmatch(text)
    value = whole * int(m.group(1)) / 100 if m else parse(text)
    return max(1, int(value))


def pool_mib(app: App) -> int:
    try:
        return int(shutil.disk_usage(app.pool.root).total >> 20)
    except OSError:
        return 0


def effective_quotas(app: App, role: str, own: dict[str, int | None]) -> dict[str, int | None]:
    """Each quota as it applies to a user: their own (-1: no limit), else, for a member,
    the server's default from the settings. None means no limit.

    Admins get no defaults: they may set any user's quota, their own included, so a
    default would only be a step in their way, not a bound.
    """
    out: dict[str, int | None] = {}
    for f in QUOTAS:
        value = own.get(f)
        if value is not None:
            out[f] = None if value < 0 else value
        elif role == "admin":
            out[f] = None
        else:
            out[f] = _server_default(app, f)
    return out


def _server_default(app: App, field: str) -> int | None:
    s = app.settings
    if field == "max_workspaces":
        return None if s.default_max_workspaces < 0 else s.default_max_workspaces
    if field == "max_cpu":
        return _default(s.default_max_cpu, os.cpu_count() or 1, float)
    if field == "max_memory_mb":
        return _default(s.default_max_memory, host_memory_mib(), lambda t: parse_mib(t, field))
    total = pool_mib(app)
    if total == 0 and s.default_max_disk.endswith("%"):
        return None  # no pool yet: nothing to take a share of, and no disk limit to count
    return _default(s.default_max_disk, total, lambda t: parse_mib(t, field))


def defaulted(role: str, own: dict[str, int | None]) -> list[str]:
    """The quotas of a user that come from the server's defaults."""
    return [] if role == "admin" else [f for f in QUOTAS if own.get(f) is None]


async def check_quota(
    ctx: Context,
    owner: User,
    cpu: float,
    memory_mb: int,
    disk_mb: int | None = None,
    exclude: str | None = None,
    pids: int = 0,
) -> None:
    """Refuse what would pass one of the owner's quotas, naming the limit and the use."""
    q = select(
        func.count(Workspace.id),
        func.coalesce(func.sum(Workspace.cpu), 0),
        func.coalesce(func.sum(Workspace.memory_mb), 0),
        func.coalesce(func.sum(Workspace.disk_mb), 0),
        func.coalesce(func.sum(Workspace.pids), 0),
    ).where(Workspace.user_id == owner.id)
    if exclude is not None:
        q = q.where(Workspace.id != exclude)
    count, cpu_used, mem_used, disk_used, pids_used = (await ctx.db.execute(q)).one()
    own = {f: getattr(owner, f) for f in QUOTAS}
    limits = effective_quotas(ctx.app, owner.role, own)
    # Where a limit comes from, for the message: an admin changes a user's own with
    # `den user set`, the defaults in den.toml.
    src = {f: f if own[f] is not None else f"{f} (the default for members)" for f in QUOTAS}
    max_ws, max_cpu = limits["max_workspaces"], limits["max_cpu"]
    max_mem, max_disk = limits["max_memory_mb"], limits["max_disk_mb"]
    if exclude is None and max_ws is not None and count + 1 > max_ws:
        raise QuotaExceeded(
            f"quota {src['max_workspaces']} is {max_ws} and {owner.name} has {count} workspaces"
        )
    if max_cpu is not None and float(cpu_used) + cpu > max_cpu:
        raise QuotaExceeded(
            f"quota {src['max_cpu']} is {max_cpu}: {owner.name}'s other workspaces use "
            f"{float(cpu_used):g} CPUs and this one asks for {cpu:g}"
        )
    if max_mem is not None and int(mem_used) + memory_mb > max_mem:
        raise QuotaExceeded(
            f"quota {src['max_memory_mb']} is {max_mem}: {owner.name}'s other workspaces use "
            f"{int(mem_used)} MiB and this one asks for {memory_mb} MiB"
        )
    if max_disk is not None and disk_mb is None and own["max_disk_mb"] is not None:
        # The default counts disk limits only: a workspace without one (disk limits
        # off) has none to count. A quota set for this user asks for one.
        raise QuotaExceeded(
            f"{owner.name} has a disk quota (max_disk_mb {max_disk}): give the "
            "workspace a disk size (--disk)"
        )
    if max_disk is not None and disk_mb is not None and int(disk_used or 0) + disk_mb > max_disk:
        raise QuotaExceeded(
            f"quota {src['max_disk_mb']} is {max_disk}: {owner.name}'s other workspaces "
            f"use {int(disk_used or 0)} MiB and this one asks for {disk_mb} MiB"
        )
    bound = user_pids_bound()
    raising = pids > ctx.app.settings.default_pids and not ctx.caller.is_admin
    if raising and owner.role != "admin" and int(pids_used) + pids > bound:
        raise QuotaExceeded(
            f"pids of {owner.name}'s workspaces together may not pass {bound} (half of this "
            f"host's pid_max, {pid_max()}): the others have {int(pids_used)} and this one "
            f"asks for {pids}; ask an admin for more"
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
    bound = workspace_pids_bound()
    if not 16 <= pids <= bound:
        raise InvalidParams(
            f"pids must be between 16 and {bound} (a quarter of this host's pid_max, {pid_max()})",
            field="pids",
        )


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
            else "btrfs quotas are not on in the pool"
        )
        raise BackendFailure(
            f"disk limits are on (disk_quota = true) but {why}: run `den init` (it makes the "
            "pool btrfs with quotas), or set disk_quota = false to run workspaces without disk limits"
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
