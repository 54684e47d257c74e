"""Busy leases ("I am busy" from inside) and `den why`.

A busy lease holds a workspace awake until a time (POST /v1/busy?for=20m on
the metadata service, or `den-busy 20m` inside, or `den busy NAME 20m`),
at most ``busy_max_seconds`` ahead. The idle checker suspends or stops
nothing that holds one; a lease is not activity: when it ends, a workspace
idle for longer than its policy is suspended at the next check. Leases are
rows (busy_leases): they survive a daemon restart; an expired one is ignored
(and replaced by the next).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field
from sqlalchemy import delete

from den.db.models import BusyLease
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services.common import parse_duration
from den.services.idle import effective
from den.services.workspaces import WsRef, find_workspace

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession


async def lease_until(db: AsyncSession, ws_id: str) -> datetime | None:
    """The end of the workspace's busy lease, if one holds now."""
    lease = await db.get(BusyLease, ws_id)
    if lease is None or lease.until <= datetime.now(UTC):
        return None
    return lease.until


class BusyParams(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    duration: Annotated[str | None, CliArg()] = Field(
        None,
        max_length=32,
        description="How long to hold it awake (20m, 2h; 0 ends the lease); none: show it.",
    )


class BusyOut(BaseModel):
    target: str
    busy_until: datetime | None = Field(description="Held awake until then (null: no lease).")


@method("workspace.busy", right=Right.write, cli=Cli("busy"))
async def workspace_busy(ctx: Context, p: BusyParams) -> BusyOut:
    """Hold a workspace awake for a while (a busy lease), end the lease (0), or show it.

    The idle checker suspends or stops nothing holding a lease; the longest is
    the server's busy_max_seconds. Inside a workspace: `den-busy 20m`.
    """
    ws, owner = await find_workspace(ctx, p.ref)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    if p.duration is None:
        return BusyOut(
            target=f"{owner.name}/{ws.name}", busy_until=await lease_until(ctx.db, ws.id)
        )
    limit = ctx.app.settings.busy_max_seconds
    seconds = parse_duration(p.duration, field="duration", limit=limit)
    await ctx.db.execute(delete(BusyLease).where(BusyLease.ws_id == ws.id))
    until = None
    if seconds > 0:
        until = datetime.now(UTC) + timedelta(seconds=seconds)
        ctx.db.add(BusyLease(ws_id=ws.id, until=until, by=ctx.caller.name))
    await ctx.db.flush()
    return BusyOut(target=f"{owner.name}/{ws.name}", busy_until=until)


class Seen(BaseModel):
    kind: str
    at: datetime


class WhyOut(BaseModel):
    target: str
    state: str
    summary: str = Field(description="The answer in one sentence.")
    last_activity_at: datetime | None
    last_activity_kind: str
    activity: list[Seen] = Field(description="The last time of each kind den saw (newest first).")
    idle_suspend: int = Field(description="Seconds idle before it is suspended (0: never).")
    idle_stop: int = Field(description="Seconds idle before it is stopped (0: never).")
    policy_from: str = Field(description="workspace, user or server: where the policy comes from.")
    busy_until: datetime | None
    suspend_at: datetime | None = Field(description="When it is suspended if nothing happens.")
    stop_at: datetime | None = Field(description="When it is stopped if nothing happens.")


def _when(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC")


@method("workspace.why", right=Right.read, cli=Cli("why"))
async def workspace_why(ctx: Context, p: WsRef) -> WhyOut:
    """Why a workspace is awake or asleep: its last activity of each kind, its idle
    policy, its busy lease, and when it will be suspended or stopped."""
    ws, owner = await find_workspace(ctx, p.ref, deleting=True)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    app = ctx.app
    seen = {k: datetime.fromtimestamp(t, UTC) for k, t in app.activity.kinds(ws.id).items()}
    if ws.last_activity_at is not None and ws.last_activity_kind:
        k = ws.last_activity_kind
        seen[k] = max(seen.get(k, ws.last_activity_at), ws.last_activity_at)
    last = max(seen.values(), default=ws.last_activity_at or ws.created_at)
    last_kind = max(seen, key=lambda k: seen[k]) if seen else "created"
    suspend_after, stop_after = effective(ws, owner, app)
    src = (
        "workspace"
        if ws.idle_suspend is not None or ws.idle_stop is not None
        else "user"
        if owner.idle_suspend is not None or owner.idle_stop is not None
        else "server"
    )
    busy = await lease_until(ctx.db, ws.id)
    floor = max(busy or last, last)
    suspend_at = stop_at = None
    if ws.state == "running" and suspend_after:
        suspend_at = max(last + timedelta(seconds=suspend_after), floor)
    if ws.state in ("running", "suspended") and stop_after:
        stop_at = max(last + timedelta(seconds=stop_after), floor)
    busy_now = app.activity.is_busy(ws.id)
    if ws.state not in ("running", "suspended"):
        summary = f"it is {ws.state}" + (f": {ws.state_reason}" if ws.state_reason else "")
    elif busy_now:
        summary = f"awake: a {busy_now} is under way"
    elif busy is not None:
        summary = f"held awake by a busy lease until {_when(busy)}"
    elif ws.state == "suspended":
        summary = "suspended" + (f": {ws.state_reason}" if ws.state_reason else "")
    elif suspend_at is None:
        summary = "awake: its policy never suspends it"
    else:
        summary = f"awake: last activity ({last_kind}) at {_when(last)}; suspended at {_when(suspend_at)} unless something happens"
    return WhyOut(
        target=f"{owner.name}/{ws.name}",
        state=ws.state,
        summary=summary,
        last_activity_at=last,
        last_activity_kind=last_kind,
        activity=[
            Seen(kind=k, at=t) for k, t in sorted(seen.items(), key=lambda kv: kv[1], reverse=True)
        ],
        idle_suspend=suspend_after,
        idle_stop=stop_after,
        policy_from=src,
        busy_until=busy,
        suspend_at=suspend_at,
        stop_at=stop_at,
    )
