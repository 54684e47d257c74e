"""The reconciler: compares the database with the host and converges.

At start (``startup=True``) it also finishes what a crash interrupted:
``creating`` rows are undone (their caller never got an answer), ``deleting``
rows are finished. On every pass: workspaces whose processes are not in the
state the database says are started, stopped or frozen; what the host has
with no record (containers, cgroups, bundles, network namespaces, veths,
volumes) is removed; what cannot be repaired is marked ``failed`` with a
reason.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import select

from den import tasks
from den.db.models import User, Workspace
from den.errors import DenError
from den.net import links, names
from den.services.workspaces import spec_of

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App

log = logging.getLogger(__name__)


@dataclass
class Report:
    repaired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def reconcile(app: App, *, startup: bool = False) -> Report:
    report = Report()
    backend = app.backend
    async with app.sessions() as db:
        rows = (
            await db.execute(select(Workspace, User).join(User, Workspace.user_id == User.id))
        ).all()
        for ws, owner in rows:
            lock = app.ws_lock(ws.id)
            if lock.locked():
                continue  # an operation is under way on it
            async with lock:
                try:
                    await _one(app, db, ws, owner, startup, report)
                except DenError as exc:
                    log.warning("cannot repair workspace %s: %s", ws.id, exc.message)
                    ws.state = "failed"
                    ws.state_reason = exc.message[:500]
                    report.failed.append(ws.id)
                await db.commit()
        known = {ws.id for ws, _ in rows} - set(report.removed)
        await _orphans(app, known, report)
        left = (await db.execute(select(Workspace.id))).scalars().all()
        bridge = names.bridge(app.settings.instance)
        if not left and await asyncio.to_thread(links.link_exists, bridge):
            await backend.teardown_host()
        elif left:
            await backend.network.ensure(check=True)
    if report.repaired or report.removed or report.failed:
        log.info(
            "reconciled",
            extra={
                "ctx": {
                    "repaired": len(report.repaired),
                    "removed": len(report.removed),
                    "failed": len(report.failed),
                }
            },
        )
    return report


async def _one(
    app: App, db: AsyncSession, ws: Workspace, owner: User, startup: bool, report: Report
) -> None:
    backend = app.backend
    spec = spec_of(app, ws, owner)
    state = dict(ws.backend_state or {})
    if ws.state in ("creating", "deleting"):
        if not startup:
            return
        # A create that never answered is undone; a delete is finished.
        await backend.delete(spec, state)
        await app.pool.delete_volume(ws.id)
        await db.delete(ws)
        report.removed.append(ws.id)
        return
    if ws.state == "failed":
        return
    if not spec.rootfs.exists():
        ws.state = "failed"
        ws.state_reason = "its root filesystem snapshot is missing from the pool"
        report.failed.append(ws.id)
        return
    actual = await backend.status(spec, state)
    if ws.state == "running" and actual != "running":
        if actual == "suspended":
            await backend.resume(spec, state)
        else:
            await backend.start(spec, state)
        report.repaired.append(ws.id)
    elif ws.state == "suspended" and actual != "suspended":
        if actual == "running":
            await backend.suspend(spec, state)
        else:
            ws.state = "stopped"
            ws.state_reason = (
                "it was suspended when its processes ended (host restart?); memory lost"
            )
        report.repaired.append(ws.id)
    elif ws.state == "stopped" and actual in ("running", "suspended"):
        await backend.stop(spec, state)
        report.repaired.append(ws.id)


async def _orphans(app: App, known: set[str], report: Report) -> None:
    backend = app.backend
    for ws_id in await backend.orphans(known):
        log.info("removing orphan workspace %s from the host", ws_id)
        await backend.remove_orphan(ws_id)
        report.removed.append(ws_id)
    net = backend.network
    for ws_id in await asyncio.to_thread(net.orphans, known):
        await net.detach(ws_id)
        vp = names.veth_prefix(app.settings.instance)
        await asyncio.to_thread(links.delete_link, vp + ws_id)
    for vid in app.pool.volume_ids():
        if vid not in known:
            log.info("removing orphan volume %s", vid)
            await app.pool.delete_volume(vid)
            report.removed.append(vid)


async def loop(app: App) -> None:
    """Reconcile every ``reconcile_interval`` seconds, forever."""
    interval = app.settings.reconcile_interval
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        try:
            await reconcile(app)
        except Exception:  # the loop must survive one bad pass
            log.exception("reconciler pass failed")


def start_loop(app: App) -> None:
    tasks.spawn(loop(app), name="reconciler")
