"""Resource metrics: a sampler into a bounded time series, queries, node stats."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field
from sqlalchemy import delete, func, insert, select

from den import tasks
from den.db.models import MetricSample, User, Workspace
from den.rpc.registry import Cli, CliArg, Context, NoParams, Params, Right, method
from den.services.common import parse_when
from den.services.workspaces import find_workspace, live_workspaces, spec_of

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)


async def sample_once(app: App) -> int:
    """Take one sample of every running or suspended workspace; drop old samples."""
    now = datetime.now(UTC)
    async with app.sessions() as db:
        rows = await live_workspaces(db)
        states = (
            await db.execute(select(Workspace.state, func.count()).group_by(Workspace.state))
        ).all()
        for st in ("creating", "running", "suspended", "stopped", "failed", "deleting"):
            app.metrics.workspaces.labels(st).set(0)
        for st, n in states:
            app.metrics.workspaces.labels(st).set(n)
        kinds: dict[str, int] = {}
        for sess in app.ssh_sessions.list():
            for kind in sess.kinds or ["idle"]:
                kinds[kind] = kinds.get(kind, 0) + 1
        for kind in {"shell", "exec", "sftp", "forward", "den", "idle", *kinds}:
            app.metrics.sessions.labels(kind).set(kinds.get(kind, 0))
        samples: list[dict[str, object]] = []
        for ws, owner in rows:
            try:
                spec = spec_of(app, ws, owner)
                stats = await app.backend_for(spec).stats(spec, dict(ws.backend_state or {}))
            except Exception:  # one broken workspace must not stop the sampler
                log.exception("cannot sample workspace %s", ws.id)
                continue
            ref = f"{owner.name}/{ws.name}"
            app.metrics.ws_cpu.labels(ref).set(stats.cpu_seconds)
            app.metrics.ws_memory.labels(ref).set(stats.memory_bytes)
            samples.append(
                {
                    "workspace_id": ws.id,
                    "at": now,
                    "cpu_seconds": stats.cpu_seconds,
                    "memory_bytes": stats.memory_bytes,
                    "pids": stats.pids,
                    "net_rx_bytes": stats.net_rx_bytes,
                    "net_tx_bytes": stats.net_tx_bytes,
                    "disk_bytes": None,
                }
            )
        if samples:
            # One executemany, not an ORM flush of one object per workspace.
            await db.execute(insert(MetricSample), samples)
        cutoff = now - timedelta(seconds=app.settings.metrics_retention)
        await db.execute(delete(MetricSample).where(MetricSample.at < cutoff))
        await db.commit()
    return len(rows)


async def sampler(app: App) -> None:
    while True:
        try:
            await sample_once(app)
        except Exception:  # the loop must survive one bad pass
            log.exception("metrics sampler pass failed")
        await asyncio.sleep(app.settings.metrics_interval)


def start(app: App) -> None:
    tasks.spawn(sampler(app), name="metrics-sampler")


class MetricsQuery(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    since: str = Field("1h", max_length=64, description="From when: 15m, 2h or ISO 8601.")
    step: int = Field(0, ge=0, le=86400, description="Seconds per point (0: every sample).")


class Point(BaseModel):
    at: datetime
    cpu_seconds: float
    cpu_cores: float = Field(description="Average CPU use since the previous point, in cores.")
    memory_bytes: int
    pids: int
    net_rx_bytes: int
    net_tx_bytes: int
    disk_bytes: int | None


@method(
    "workspace.metrics",
    right=Right.read,
    cli=Cli(
        "metrics",
        columns=("at", "cpu_cores", "memory_bytes", "pids", "net_rx_bytes", "net_tx_bytes"),
    ),
)
async def workspace_metrics(ctx: Context, p: MetricsQuery) -> list[Point]:
    """A workspace's resource use over time (CPU, memory, pids, network, disk)."""
    ws, _owner = await find_workspace(ctx, p.ref)
    since = parse_when(p.since, field="since", future=False)
    rows = (
        (
            await ctx.db.execute(
                select(MetricSample)
                .where(MetricSample.workspace_id == ws.id, MetricSample.at >= since)
                .order_by(MetricSample.at)
            )
        )
        .scalars()
        .all()
    )
    points: list[Point] = []
    prev: MetricSample | None = None
    last_kept: datetime | None = None
    for r in rows:
        if p.step and last_kept is not None and (r.at - last_kept).total_seconds() < p.step:
            continue
        cores = 0.0
        if prev is not None:
            dt = (r.at - prev.at).total_seconds()
            if dt > 0:
                cores = max(0.0, (r.cpu_seconds - prev.cpu_seconds) / dt)
        points.append(
            Point(
                at=r.at,
                cpu_seconds=r.cpu_seconds,
                cpu_cores=round(cores, 4),
                memory_bytes=r.memory_bytes,
                pids=r.pids,
                net_rx_bytes=r.net_rx_bytes,
                net_tx_bytes=r.net_tx_bytes,
                disk_bytes=r.disk_bytes,
            )
        )
        prev = r
        last_kept = r.at
    return points


class Usage(BaseModel):
    ref: str
    state: str
    cpu_cores: float
    memory_bytes: int
    memory_limit_bytes: int
    pids: int
    last_activity_at: datetime | None
    last_activity_kind: str


@method(
    "workspace.usage",
    right=Right.read,
    cli=Cli(
        "usage", columns=("ref", "state", "cpu_cores", "memory_bytes", "pids", "last_activity_kind")
    ),
)
async def workspace_usage(ctx: Context, p: NoParams) -> list[Usage]:
    """Current use of the workspaces you may see, busiest first (what `den top` shows)."""
    q = select(Workspace, User).join(User, Workspace.user_id == User.id)
    q = q.where(Workspace.state != "deleting")
    if not ctx.caller.is_admin:
        q = q.where(Workspace.user_id == ctx.caller.user_id)
    rows = (await ctx.db.execute(q)).all()
    out = []
    for ws, owner in rows:
        last = (
            (
                await ctx.db.execute(
                    select(MetricSample)
                    .where(MetricSample.workspace_id == ws.id)
                    .order_by(MetricSample.at.desc())
                    .limit(2)
                )
            )
            .scalars()
            .all()
        )
        cores = 0.0
        if len(last) == 2:
            dt = (last[0].at - last[1].at).total_seconds()
            if dt > 0:
                cores = max(0.0, (last[0].cpu_seconds - last[1].cpu_seconds) / dt)
        out.append(
            Usage(
                ref=f"{owner.name}/{ws.name}",
                state=ws.state,
                cpu_cores=round(cores, 3),
                memory_bytes=last[0].memory_bytes if last else 0,
                memory_limit_bytes=ws.memory_mb << 20,
                pids=last[0].pids if last else 0,
                last_activity_at=ws.last_activity_at,
                last_activity_kind=ws.last_activity_kind,
            )
        )
    out.sort(key=lambda u: (u.cpu_cores, u.memory_bytes), reverse=True)
    return out


class NodeStats(BaseModel):
    users: int
    workspaces: dict[str, int]
    sessions: int
    cpus: int
    load_1m: float
    memory_total_bytes: int
    memory_available_bytes: int
    pool_total_bytes: int
    pool_used_bytes: int
    pool_free_bytes: int
    uptime_s: float


def _meminfo() -> tuple[int, int]:
    total = avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    return total, avail


@method("stats", right=Right.read, cli=Cli("stats"))
async def stats(ctx: Context, p: NoParams) -> NodeStats:
    """Users, workspaces by state, sessions, and this node's CPU, memory and disk use."""
    users = (await ctx.db.execute(select(func.count(User.id)))).scalar_one()
    by_state = dict(
        (
            await ctx.db.execute(select(Workspace.state, func.count()).group_by(Workspace.state))
        ).all()
    )
    total, avail = _meminfo()
    pool_root = ctx.app.pool.root if ctx.app.pool.root.exists() else ctx.app.settings.data_dir
    du = shutil.disk_usage(pool_root)
    count = len(ctx.app.ssh_sessions.list())
    return NodeStats(
        users=users,
        workspaces={str(k): int(v) for k, v in by_state.items()},
        sessions=count,
        cpus=os.cpu_count() or 1,
        load_1m=os.getloadavg()[0],
        memory_total_bytes=total,
        memory_available_bytes=avail,
        pool_total_bytes=du.total,
        pool_used_bytes=du.used,
        pool_free_bytes=du.free,
        uptime_s=(datetime.now(UTC) - ctx.app.started_at).total_seconds(),
    )
