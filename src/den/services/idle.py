"""Idle management: suspend or stop workspaces by real activity, never by open connections.

A workspace is active when, since the last check, someone typed into or read
from one of its sessions, an exec or a transfer ran, its CPU use was above
``idle_cpu_threshold`` cores, or its veth carried more than
``idle_net_threshold`` bytes. Policy per workspace, else per owner, else
global: suspend after ``idle_suspend`` seconds, stop after ``idle_stop``
seconds (0: never).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from pydantic import BaseModel, Field

from den import tasks
from den.db.models import AuditEvent, BusyLease, User, Workspace
from den.errors import DenError, InvalidParams
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services.common import Name, parse_duration, user_or_self
from den.services.workspaces import find_workspace, live_workspaces, spec_of

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App

log = logging.getLogger(__name__)


@dataclass
class _Seen:
    at: float
    cpu_seconds: float
    net_bytes: int


def effective(ws: Workspace, owner: User, app: App) -> tuple[int, int]:
    """(suspend after, stop after) in seconds for this workspace; 0 means never."""
    s = app.settings
    suspend = ws.idle_suspend if ws.idle_suspend is not None else owner.idle_suspend
    stop = ws.idle_stop if ws.idle_stop is not None else owner.idle_stop
    return (
        s.idle_suspend if suspend is None else suspend,
        s.idle_stop if stop is None else stop,
    )


class IdleChecker:
    def __init__(self, app: App) -> None:
        self.app = app
        self.seen: dict[str, _Seen] = {}

    async def check(self) -> list[tuple[str, str]]:
        """One pass; returns the (workspace id, action) pairs it took."""
        app = self.app
        actions: list[tuple[str, str]] = []
        async with app.sessions() as db:
            rows = await live_workspaces(db)
            for ws, owner in rows:
                try:
                    action = await self._one(db, ws, owner)
                except DenError as exc:
                    log.warning("idle check of %s failed: %s", ws.id, exc.message)
                    continue
                if action:
                    actions.append((ws.id, action))
            await db.commit()
        live = {ws.id for ws, _ in rows}
        for gone in set(self.seen) - live:
            del self.seen[gone]
        return actions

    async def _one(self, db: AsyncSession, ws: Workspace, owner: User) -> str | None:
        app = self.app
        s = app.settings
        now = time.time()
        kind: str | None = app.activity.is_busy(ws.id)
        first_look = ws.id not in self.seen
        if ws.state == "running":
            spec = spec_of(app, ws, owner)
            stats = await app.backend_for(spec).stats(spec, dict(ws.backend_state or {}))
            net = stats.net_rx_bytes + stats.net_tx_bytes
            prev = self.seen.get(ws.id)
            if prev is not None and kind is None:
                dt = max(now - prev.at, 1e-3)
                if (stats.cpu_seconds - prev.cpu_seconds) / dt > s.idle_cpu_threshold:
                    kind = "cpu"
                elif net - prev.net_bytes > s.idle_net_threshold:
                    kind = "network"
            self.seen[ws.id] = _Seen(now, stats.cpu_seconds, net)
        reported = app.activity.last(ws.id)
        last = ws.last_activity_at.timestamp() if ws.last_activity_at else ws.created_at.timestamp()
        if kind is not None:
            last = now
        elif reported is not None and reported[0] > last + 0.001:
            # (the database keeps microseconds: a float time read back can be a
            # fraction lower, and must not count as new activity on every pass)
            last, kind = reported
        if kind is not None:
            ws.last_activity_at = datetime.fromtimestamp(last, UTC)
            ws.last_activity_kind = kind
            return None
        if first_look:
            return None  # no CPU or network delta yet: never judge on one look
        lease = await db.get(BusyLease, ws.id)
        if lease is not None and lease.until > datetime.now(UTC):
            return None  # a busy lease (den.services.why) holds it awake: a hold, not activity
        suspend_after, stop_after = effective(ws, owner, app)
        idle_for = now - last
        if stop_after and idle_for >= stop_after:
            await self._act(db, ws, owner, "stop", idle_for)
            return "stop"
        if ws.state == "running" and suspend_after and idle_for >= suspend_after:
            await self._act(db, ws, owner, "suspend", idle_for)
            return "suspend"
        return None

    async def _act(
        self, db: AsyncSession, ws: Workspace, owner: User, action: str, idle_for: float
    ) -> None:
        app = self.app
        lock = app.ws_lock(ws.id)
        if lock.locked():
            return
        reason = f"idle for {int(idle_for)} s: no input or output, exec, transfer, CPU or network activity"
        start = time.perf_counter()
        async with lock:
            spec = spec_of(app, ws, owner)
            state = dict(ws.backend_state or {})
            if action == "suspend":
                ws.backend_state = await app.backend_for(spec).suspend(spec, state)
                ws.state = "suspended"
                app.metrics.suspend_latency.labels("idle").observe(time.perf_counter() - start)
            else:
                ws.backend_state = await app.backend_for(spec).stop(spec, state)
                ws.state = "stopped"
            ws.state_reason = f"{action}ed automatically: {reason}".replace("stoped", "stopped")
            app.metrics.transitions.labels(action, "idle").inc()
            db.add(
                AuditEvent(
                    actor="den",
                    via="idle",
                    method=f"workspace.{action}",
                    target=f"workspace:{owner.name}/{ws.name}",
                    params={"reason": reason},
                    outcome="ok",
                    error="",
                    duration_ms=round((time.perf_counter() - start) * 1e3, 3),
                )
            )
            await db.commit()
        log.info("%s %s/%s: %s", action, owner.name, ws.name, reason)


async def loop(app: App) -> None:
    checker = IdleChecker(app)
    app.idle = checker
    while True:
        await asyncio.sleep(app.settings.idle_check_interval)
        try:
            await checker.check()
        except Exception:  # the loop must survive one bad pass
            log.exception("idle check failed")


def start(app: App) -> None:
    tasks.spawn(loop(app), name="idle-checker")


# -- policy methods ------------------------------------------------------------------


def parse_policy(value: str | None, field: str) -> int | None:
    """ "5m", "300", "2h" -> seconds; "never" -> 0; "default" -> None (inherit)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("never", "off", "0"):
        return 0
    if text == "default":
        return None
    seconds = parse_duration(text, field=field)
    if seconds < 10:
        raise InvalidParams("an idle timeout is at least 10 s (or never)", field=field)
    return seconds


class Policy(BaseModel):
    target: str
    idle_suspend: int | None = Field(description="Seconds; 0 never; null inherits.")
    idle_stop: int | None = Field(description="Seconds; 0 never; null inherits.")
    effective_suspend: int
    effective_stop: int


class WsIdle(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    suspend: str | None = Field(None, max_length=16, description="5m, 1h, never or default.")
    stop: str | None = Field(None, max_length=16, description="8h, never or default.")


@method("workspace.idle", right=Right.write, cli=Cli("idle"))
async def workspace_idle(ctx: Context, p: WsIdle) -> Policy:
    """Show or set when a workspace is suspended or stopped for being idle."""
    ws, owner = await find_workspace(ctx, p.ref)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    if p.suspend is not None:
        ws.idle_suspend = parse_policy(p.suspend, "suspend")
    if p.stop is not None:
        ws.idle_stop = parse_policy(p.stop, "stop")
    await ctx.db.flush()
    sus, stop = effective(ws, owner, ctx.app)
    return Policy(
        target=f"{owner.name}/{ws.name}",
        idle_suspend=ws.idle_suspend,
        idle_stop=ws.idle_stop,
        effective_suspend=sus,
        effective_stop=stop,
    )


class UserIdle(Params):
    user: Annotated[Name | None, CliArg()] = Field(None, description="The user (default: you).")
    suspend: str | None = Field(None, max_length=16, description="5m, 1h, never or default.")
    stop: str | None = Field(None, max_length=16, description="8h, never or default.")


@method("user.idle", right=Right.write, cli=Cli("user idle"))
async def user_idle(ctx: Context, p: UserIdle) -> Policy:
    """Show or set a user's default idle policy for their workspaces."""
    owner = await user_or_self(ctx, p.user)
    ctx.target = f"user:{owner.name}"
    if p.suspend is not None:
        owner.idle_suspend = parse_policy(p.suspend, "suspend")
    if p.stop is not None:
        owner.idle_stop = parse_policy(p.stop, "stop")
    await ctx.db.flush()
    s = ctx.app.settings
    return Policy(
        target=owner.name,
        idle_suspend=owner.idle_suspend,
        idle_stop=owner.idle_stop,
        effective_suspend=s.idle_suspend if owner.idle_suspend is None else owner.idle_suspend,
        effective_stop=s.idle_stop if owner.idle_stop is None else owner.idle_stop,
    )
