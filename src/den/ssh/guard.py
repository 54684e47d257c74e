"""What the gateway keeps about refused logins, bounded whatever a client does.

:class:`FailureLimit` counts failures per (address, key fingerprint): a client
offering wrong keys from an address every local user shares (127.0.0.1, a
NAT) locks out those keys only, never another user's good key.

:class:`DenialLog` writes refused connections to the audit log aggregated: one
row per (address, login, actor, reason) and window, carrying a count, and at
most ``cap`` such rows per window; refusals beyond the cap add to one overflow
row. An unauthenticated client cannot grow the audit table faster than that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from den import tasks
from den.db.models import AuditEvent
from den.rpc.authlimit import Failures

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

log = logging.getLogger(__name__)


class FailureLimit(Failures[tuple[str, str]]):
    """Failed logins per (address, key fingerprint); ``limit`` of them within
    ``window`` seconds block that pair."""

    def blocked(self, addr: str, fingerprint: str) -> bool:
        return self.retry_after((addr, fingerprint)) > 0

    def failed(self, addr: str, fingerprint: str) -> None:  # type: ignore[override]
        super().failed((addr, fingerprint))


OVERFLOW = ("*", "*", "anonymous", "refused connections beyond the audit's per-window cap")


@dataclass(eq=False)
class _Row:
    actor: str
    target: str
    reason: str
    params: dict[str, Any]
    count: int = 0
    id: int | None = None
    dirty: bool = False
    keys: list[str] = field(default_factory=list)


class DenialLog:
    """Refused connections, aggregated into the audit log (see the module's doc)."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], window: float = 60.0, cap: int = 100
    ) -> None:
        self.sessions = sessions
        self.window = window
        self.cap = cap
        self._rows: dict[tuple[str, str, str, str], _Row] = {}
        self._began = time.monotonic()
        self._dirty: list[_Row] = []
        self._writer: asyncio.Task[None] | None = None

    def add(self, addr: str, login: str, actor: str, reason: str, keys: list[str]) -> None:
        now = time.monotonic()
        if now - self._began >= self.window:
            self._rows = {}  # the rows written so far stay as they are
            self._began = now
        key = (addr, login[:64], actor[:64], reason)
        if key not in self._rows and len(self._rows) >= self.cap:
            key = OVERFLOW
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = _Row(
                actor=key[2],
                target=f"ssh:{key[1]}",
                reason=key[3],
                params={"client": key[0], "login": key[1]},
            )
        row.count += 1
        for k in keys:
            if k not in row.keys and len(row.keys) < 10:
                row.keys.append(k)
        if not row.dirty:
            row.dirty = True
            self._dirty.append(row)
        if self._writer is None:
            self._writer = tasks.spawn(self._write(), name="ssh-denials")

    async def _write(self) -> None:
        """Write what changed, at most once a second while refusals keep coming."""
        try:
            while self._dirty:
                rows, self._dirty = self._dirty, []
                for r in rows:
                    r.dirty = False
                try:
                    await self._store(rows)
                except Exception:
                    log.exception("could not write ssh denials to the audit log")
                await asyncio.sleep(1.0)
        finally:
            self._writer = None

    async def _store(self, rows: list[_Row]) -> None:
        async with self.sessions() as db:
            for r in rows:
                params = {**r.params, "keys": sorted(r.keys), "count": r.count}
                if r.id is None:
                    ev = AuditEvent(
                        actor=r.actor,
                        via="ssh",
                        method="ssh.denied",
                        target=r.target[:200],
                        params=params,
                        outcome="denied",
                        error=r.reason[:2000],
                        duration_ms=0.0,
                    )
                    db.add(ev)
                    await db.flush()
                    r.id = ev.id
                else:
                    await db.execute(
                        update(AuditEvent).where(AuditEvent.id == r.id).values(params=params)
                    )
            await db.commit()
