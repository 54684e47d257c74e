"""The reconciler: compares the database with the host and converges.

At start (``startup=True``) it also finishes what a crash interrupted:
``creating`` rows are undone (their caller never got an answer), ``deleting``
rows are finished. On every pass: workspaces whose processes are not in the
state the database says are started, stopped or frozen; ``deleting`` rows
whose delete failed are tried again; what the host has with no record
(containers, cgroups, bundles, network namespaces, veths, volumes) is
removed; what cannot be repaired is marked ``failed`` with a reason. A
workspace its backend finds ``failed`` (a microVM whose QEMU was killed or
whose guest panicked) is not started again: its host leftovers are cleaned
(the backend's stop; its files stay), it is marked ``failed`` with the
backend's reason, and ``den start`` boots it again.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update

from den import tasks
from den.db.models import User, Workspace
from den.errors import DenError
from den.net import links, names
from den.services.workspaces import failure_reason, remove_from_host, spec_of

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)


@dataclass
class Report:
    repaired: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


async def reconcile(app: App, *, startup: bool = False) -> Report:
    report = Report()
    # Each read and write is a short session of its own: none is held across
    # host work, which may take seconds per workspace.
    async with app.sessions() as db:
        rows = (
            await db.execute(select(Workspace, User).join(User, Workspace.user_id == User.id))
        ).all()
    for ws, owner in rows:
        lock = app.ws_lock(ws.id)
        if lock.locked():
            continue  # an operation is under way on it
        async with lock:
            await _guarded(app, ws, owner, startup, report)
    known = {ws.id for ws, _ in rows} - set(report.removed)
    await _orphans(app, known, report)
    async with app.sessions() as db:
        left = (await db.execute(select(Workspace.id))).scalars().all()
    bridge = names.bridge(app.settings.instance)
    if not left and await asyncio.to_thread(links.link_exists, bridge):
        await app.teardown_host()
    elif left:
        await app.network.ensure(check=True)
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


async def _guarded(app: App, ws: Workspace, owner: User, startup: bool, report: Report) -> None:
    """Repair one workspace (its lock held) and write the outcome back."""
    async with app.sessions() as db:
        fresh = await db.get(Workspace, ws.id)  # the list may be seconds old by now
    if fresh is None:
        return
    ws = fresh
    before = ws.state, ws.state_reason, ws.backend_state
    try:
        await _one(app, ws, owner, startup, report)
    except Exception as exc:
        if ws.state == "deleting":  # stays deleting, with the reason; retried next pass
            ws.state_reason = failure_reason(exc)
            log.warning("cannot finish deleting workspace %s: %s", ws.id, ws.state_reason)
        elif isinstance(exc, DenError):
            log.warning("cannot repair workspace %s: %s", ws.id, exc.message)
            ws.state = "failed"
            ws.state_reason = exc.message[:500]
        else:
            raise
        report.failed.append(ws.id)
    async with app.sessions() as db:
        if ws.id in report.removed:
            await db.execute(delete(Workspace).where(Workspace.id == ws.id))
        elif (ws.state, ws.state_reason, ws.backend_state) != before:
            await db.execute(
                update(Workspace)
                .where(Workspace.id == ws.id)
                .values(
                    state=ws.state,
                    state_reason=ws.state_reason,
                    backend_state=ws.backend_state,
                    # a core update passes by the listener that keeps these (models.py)
                    started_at=ws.started_at,
                    stopped_at=ws.stopped_at,
                )
            )
        await db.commit()


async def _one(app: App, ws: Workspace, owner: User, startup: bool, report: Report) -> None:
    spec = spec_of(app, ws, owner)
    backend = app.backend_for(spec)
    state = dict(ws.backend_state or {})
    if ws.state == "creating" and not startup:
        return  # a create under way
    if ws.state in ("creating", "deleting"):
        # A create that never answered is undone; a delete is finished, or
        # retried on every pass until what made it fail is fixed.
        await remove_from_host(app, ws, owner)
        if ws.state == "deleting" and ws.state_reason:
            log.info("finished deleting workspace %s", ws.id)
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
    if actual == "failed":
        why = await backend.failure(spec, state) or "it ended without den stopping it"
        ws.backend_state = await backend.stop(spec, state)  # its leftovers, not its files
        if ws.state in ("running", "suspended"):
            log.warning("workspace %s failed: %s", ws.id, why)
            ws.state = "failed"
            ws.state_reason = why[:500]
            report.failed.append(ws.id)
        else:
            report.repaired.append(ws.id)
    elif ws.state == "running" and actual != "running":
        if actual == "suspended":
            ws.backend_state = await backend.resume(spec, state)
        else:
            ws.backend_state = await backend.start(spec, state)
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
        ws.backend_state = await backend.stop(spec, state)
        report.repaired.append(ws.id)


async def _orphans(app: App, known: set[str], report: Report) -> None:
    """Remove what the host has of workspaces with no row.

    ``known`` was read before this pass's repairs, seconds ago: a create may
    have committed its row since and already made host parts. So the ids are
    read again after the host was listed, and only what is still unknown (and
    not locked by an operation) goes. A create commits its row before it makes
    anything on the host, so what the listing saw has its row by now.
    """
    net = app.network
    parts = [(b, ws_id) for b in app.all_backends() for ws_id in await b.orphans(known)]
    links_ = await asyncio.to_thread(net.orphans, known)  # truncated ids: prefixes
    volumes = [v for v in app.pool.volume_ids() if v not in known]
    if not (parts or links_ or volumes):
        return
    async with app.sessions() as db:
        now = set((await db.execute(select(Workspace.id))).scalars().all())

    def gone(ws_id: str) -> bool:
        lock = app.ws_locks.get(ws_id)
        return not any(k.startswith(ws_id) for k in now) and not (lock and lock.locked())

    for backend, ws_id in parts:
        if gone(ws_id):
            log.info("removing orphan workspace %s from the host (%s)", ws_id, backend.name)
            await backend.remove_orphan(ws_id)
            report.removed.append(ws_id)
    for ws_id in filter(gone, links_):
        await net.detach(ws_id)
        vp = names.veth_prefix(app.settings.instance)
        await asyncio.to_thread(links.delete_link, vp + ws_id)
    for vid in filter(gone, volumes):
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
