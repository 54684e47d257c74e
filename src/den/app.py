"""The daemon's runtime: settings, the database and shared services."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from den.backends import registry
from den.config import Settings
from den.db.engine import make_engine, migrate, sessionmaker
from den.db.models import AuditEvent
from den.log import input_shapes
from den.services.accounts import Accounts
from den.services.activity import Activity
from den.services.prom import Metrics
from den.services.revocation import Revocations
from den.ssh.table import SessionTable
from den.storage.pool import Pool

if TYPE_CHECKING:
    from den.backends.base import Backend, Spec
    from den.net.network import Network
    from den.web.caddy import Caddy
    from den.web.gate import Gate

if TYPE_CHECKING:
    from den.rpc.registry import Context, Params

log = logging.getLogger(__name__)
_MAX_AUDIT_STR = 1000


def _truncate(value: Any) -> Any:
    """Shorten long strings for the audit log, and drop private keys sent by mistake."""
    if isinstance(value, str) and "PRIVATE KEY" in value:
        return "*** private key removed ***"
    if isinstance(value, str) and len(value) > _MAX_AUDIT_STR:
        return value[:_MAX_AUDIT_STR] + f"...[{len(value)} chars]"
    if isinstance(value, dict):
        return {k: _truncate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_truncate(v) for v in value[:100]]
    return value


class App:
    """Everything a method may need, created once per daemon."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Read and checked now: a broken profile stops the daemon at start.
        self.seccomp = registry.seccomp_filter() if settings.sandbox_seccomp else None
        self.started_at = datetime.now(UTC)
        self.engine: AsyncEngine = make_engine(settings.db_url)
        self.sessions: async_sessionmaker[AsyncSession] = sessionmaker(self.engine)
        self.accounts = Accounts(settings.account_prefix, settings.socket_group, settings.instance)
        self.pool = Pool.detect(settings.pool_dir, settings.storage_driver)
        self.ws_locks: dict[str, asyncio.Lock] = {}
        self.activity = Activity()
        self.metrics = Metrics()
        self.idle: object | None = None  # the idle checker, once started
        self._network: Network | None = None
        # The backends made so far, by name (den.backends.registry): each on first use.
        self.backends: dict[str, Backend] = {}
        # The SSH gateway's live sessions and its actual port (set when it listens).
        self.ssh_sessions = SessionTable()
        self.ssh_port = 0
        # Removed keys, deleted or demoted users: open SSH connections listen here.
        self.revocations = Revocations()
        # Bumped after every change to who may open workspace URLs or where they
        # lead: the web gate's caches are good only for one generation.
        self.web_generation = 0
        # The web front door, when `web` is on and den serves (den.web).
        self.gate: Gate | None = None
        self.caddy: Caddy | None = None
        self.revocations.subscribe(lambda _ev: self.web_changed())

    def web_changed(self) -> None:
        """Forget what the web gate cached (sharing, ports, sessions, domains, users)."""
        self.web_generation += 1

    @property
    def network(self) -> Network:
        """den's bridge, addresses and firewall, shared by every backend; made on
        first use (it touches the host network only when asked to)."""
        if self._network is None:
            from den.net.network import Network
            from den.services import egress

            s = self.settings
            network = Network(s.instance, s.network_subnet, s.egress, [s.ssh_port, s.http_port])
            network.exception_source = egress.exception_source(self)
            self._network = network
        return self._network

    def backend_for(self, which: Spec | str) -> Backend:
        """The backend that runs a workspace (its spec) or of that name, made on first use."""
        name = which if isinstance(which, str) else which.backend
        found = self.backends.get(name)
        if found is None:
            from den.backends.base import HostContext

            s = self.settings
            host = HostContext(
                s.instance, s.data_dir, self.pool.volumes, self.network, self.seccomp, s
            )
            found = self.backends[name] = registry.make(name, host)
        return found

    def all_backends(self) -> list[Backend]:
        """Every backend den knows, made (the reconciler looks at each)."""
        return [self.backend_for(name) for name in registry.names()]

    async def teardown_host(self) -> None:
        """Undo the instance's host changes once no workspace is left on any backend."""
        for backend in self.all_backends():
            await backend.teardown_host()
        await self.network.teardown()

    def ws_lock(self, ws_id: str) -> asyncio.Lock:
        """The lock that serialises lifecycle operations on one workspace."""
        lock = self.ws_locks.get(ws_id)
        if lock is None:
            lock = self.ws_locks[ws_id] = asyncio.Lock()
        return lock

    async def start(self) -> None:
        await migrate(self.settings.db_url)
        await self.accounts.ensure_group()
        self.pool.prepare()
        from den.storage.code import prepare as prepare_code

        await prepare_code(self.pool.code, self.settings.code_mount)
        from den.storage.images import recover

        await recover(self.pool, self.sessions)  # what interrupted image builds left

    async def close(self) -> None:
        await self.engine.dispose()

    def audit_event(
        self, ctx: Context, params: Params | None, raw: Any, outcome: str, error: str, start: float
    ) -> AuditEvent:
        from den.rpc.registry import audit_params

        # Command input (exec argv, env, stdin) is shaped before anything else
        # sees it, from the validated params or, when they failed, the raw ones.
        data = params.model_dump(mode="json") if params is not None else raw
        if isinstance(data, dict):
            data = input_shapes(data)
        return AuditEvent(
            actor=ctx.caller.name,
            via=ctx.caller.via,
            method=ctx.method.name,
            target=ctx.target[:200],
            params=_truncate(audit_params(None, data)),
            outcome=outcome,
            error=error[:2000],
            duration_ms=round((time.perf_counter() - start) * 1e3, 3),
        )

    async def write_audit(
        self, ctx: Context, params: Params | None, raw: Any, outcome: str, error: str, start: float
    ) -> None:
        """Record a failed mutating call in its own transaction."""
        async with self.sessions() as db:
            db.add(self.audit_event(ctx, params, raw, outcome, error, start))
            await db.commit()
