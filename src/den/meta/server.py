"""Listeners of the metadata service inside workspace network namespaces.

See :mod:`den.meta` for the design. Other modules extend the service:

* ``META_ROUTES``: append ``fn(router)`` at import time (a module listed in
  den.services.MODULES, or imported by one); each adds aiohttp routes to the
  metadata app. Handlers call :func:`identity` to know the workspace.
* :func:`add_port`: a further TCP service on 169.254.169.254:PORT in every
  workspace (MAIL's port 25); ``factory(ident)`` makes an asyncio.Protocol per
  connection, told which workspace it serves.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pyroute2 import IPRoute
from sqlalchemy import select

from den import tasks
from den.db.models import Workspace
from den.errors import BackendFailure
from den.meta import ADDRESS
from den.net import firewall, links, names

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)

HTTP_PORT = 80
_SO_NETNS_COOKIE = 71  # linux/asm-generic/socket.h, Linux 5.14+
# Connections one workspace may hold open to its metadata service at once: each
# is a descriptor in the daemon, whose RLIMIT_NOFILE every tenant shares (an
# LLM client keeps a few, den-busy one). Past it a connection is closed at once.
MAX_CONNECTIONS = 64
# Requests a second one workspace may make, with bursts of REQUEST_BURST: far
# above what an agent, an LLM client or den-busy needs; past it 429.
REQUESTS_PER_SECOND = 50
REQUEST_BURST = 200
IDENTITY_TTL = 5.0  # seconds a workspace's identity is served from memory
# Service port -> the port den's socket listens on inside (see inner_port).
INNER_PORTS = {HTTP_PORT: 1, 25: 2}
NAT_TABLE = "den_meta"
# The backend whose workspaces have the service (its network namespaces: den.meta.up).
SERVED_ON = "sandbox"


@dataclass(frozen=True)
class WsIdentity:
    """The workspace a metadata connection came from (by the socket it reached)."""

    ws_id: str
    name: str
    owner: str
    owner_id: int

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.name}"


META_ROUTES: list[Callable[[web.UrlDispatcher], None]] = []
ProtocolFactory = Callable[[WsIdentity], asyncio.Protocol]

APP_KEY = web.AppKey("den_app", object)
META_KEY: web.AppKey[Meta] = web.AppKey("den_meta")
_IDENT = "den.meta.identity"


def identity(request: web.Request) -> WsIdentity:
    """The workspace asking, for a handler of the metadata app."""
    ident = request.get(_IDENT)
    if not isinstance(ident, WsIdentity):  # only when called outside the metadata app
        raise web.HTTPForbidden(text="not a metadata request")
    return ident


def den_app(request: web.Request) -> App:
    return request.app[APP_KEY]  # type: ignore[return-value]


def netns_cookie(sock: Any) -> int | None:
    """The cookie of the network namespace a socket lives in."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8)
    except (OSError, AttributeError):
        return None
    return int(struct.unpack("Q", raw)[0])


@dataclass
class _Listening:
    cookie: int
    http: asyncio.Server | None = None
    connections: int = 0  # open on ``http`` now, at most MAX_CONNECTIONS
    servers: dict[int, asyncio.Server] = field(default_factory=dict)


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted in its workspace's place."""

    def __init__(self, inner: asyncio.Protocol, entry: _Listening) -> None:
        self.inner, self.entry = inner, entry
        entry.connections += 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.entry.connections -= 1
        self.inner.connection_lost(exc)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _bind(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # No SO_REUSEPORT: nobody inside may bind beside den.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ADDRESS, port))
        s.listen(128)
        s.setblocking(False)
    except OSError:
        s.close()
        raise
    return s


def inner_port(port: int) -> int:
    """The port den's socket listens on inside a workspace for service ``port``.

    Not the service's own port: a listening socket on 169.254.169.254:80 would
    make the workspace's own ``bind(0.0.0.0:80)`` (any web server, any mail
    server on 25) fail with EADDRINUSE, since a wildcard bind conflicts with
    every address on its port. den's sockets take ports nothing binds (tcpmux
    and its neighbours) and a NAT rule of den's in the workspace's namespace
    sends 169.254.169.254:PORT there; only a wildcard bind of those few ports
    is refused.
    """
    try:
        return INNER_PORTS[port]
    except KeyError:
        raise ValueError(f"the metadata service has no inner port for {port}") from None


def _nat_rules(ports: list[int]) -> str:
    """den's table in a workspace's namespace: its connections to ADDRESS:PORT
    reach den's socket at ADDRESS:inner_port(PORT). The namespace is den's (the
    host's user namespace owns it): root in the workspace cannot change it."""
    rules = "\n        ".join(
        f"ip daddr {ADDRESS} tcp dport {p} dnat to {ADDRESS}:{inner_port(p)}" for p in ports
    )
    return f"""
add table ip {NAT_TABLE}
delete table ip {NAT_TABLE}
table ip {NAT_TABLE} {{
    chain output {{
        type nat hook output priority -100; policy accept;
        {rules}
    }}
}}
"""


def _open(netns: str, ports: list[int], bind: list[int] | None = None) -> dict[int, socket.socket]:
    """Listening sockets for service ``bind`` (default: all of ``ports``), made
    inside ``netns``, with the namespace's NAT rules for all of ``ports``."""
    out: dict[int, socket.socket] = {}

    def work() -> None:
        with IPRoute() as ipr:
            lo = links.index(ipr, "lo")
            if lo is None:
                raise BackendFailure("no lo")
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=2)}
            if ADDRESS not in have:
                ipr.addr("add", index=lo, address=ADDRESS, prefixlen=32)
            ipr.link("set", index=lo, state="up")
        firewall.run(_nat_rules(ports))  # a context made in this thread: this namespace
        for port in ports if bind is None else bind:
            out[port] = _bind(inner_port(port))

    try:
        links.in_netns(netns, work)
    except BackendFailure:
        for s in out.values():
            s.close()
        raise
    return out


class Meta:
    """The metadata service of one daemon: its aiohttp runner and the listeners."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.runner: web.AppRunner | None = None
        self.ports: dict[int, ProtocolFactory] = {}
        self.open: dict[str, _Listening] = {}
        self.by_cookie: dict[int, str] = {}
        self._lock = asyncio.Lock()
        # Per workspace: its identity as read last (and when), and a token
        # bucket of requests (tokens, when last filled). One workspace hammering
        # its service must cost den neither a database read per request nor
        # the event loop's time for everyone else.
        self._idents: dict[str, tuple[float, WsIdentity]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def admit(self, ws_id: str) -> float:
        """Take a request of ``ws_id`` from its bucket; seconds to wait when empty (0: go)."""
        now = time.monotonic()
        tokens, then = self._buckets.get(ws_id, (float(REQUEST_BURST), now))
        tokens = min(float(REQUEST_BURST), tokens + (now - then) * REQUESTS_PER_SECOND)
        if tokens < 1:
            self._buckets[ws_id] = (tokens, now)
            return (1 - tokens) / REQUESTS_PER_SECOND
        self._buckets[ws_id] = (tokens - 1, now)
        return 0.0

    async def identity_of(self, ws_id: str) -> WsIdentity | None:
        now = time.monotonic()
        known = self._idents.get(ws_id)
        if known is not None and now - known[0] < IDENTITY_TTL:
            return known[1]
        ident = await self.lookup(ws_id)
        if ident is None:
            self._idents.pop(ws_id, None)
        else:
            self._idents[ws_id] = (now, ident)
        return ident

    async def setup(self) -> None:
        webapp = web.Application(client_max_size=self.app.settings.max_body_bytes)
        webapp[APP_KEY] = self.app
        webapp[META_KEY] = self
        webapp.middlewares.append(_identify)
        from den.meta import routes  # noqa: F401 - appends the service's own routes

        for add in META_ROUTES:
            add(webapp.router)
        self.runner = web.AppRunner(webapp, access_log=None, handle_signals=False)
        await self.runner.setup()

    async def lookup(self, ws_id: str) -> WsIdentity | None:
        from den.services.workspaces import workspace_by_id

        async with self.app.sessions() as db:
            row = await workspace_by_id(db, ws_id)
        if row is None or row[0].state == "deleting":
            return None
        ws, owner = row
        return WsIdentity(ws.id, ws.name, owner.name, owner.id)

    async def up(self, ws_id: str) -> None:
        """Listen inside the workspace's netns (idempotent); never fails its start."""
        async with self._lock:
            if ws_id in self.open or self.runner is None:
                return
            netns = names.netns(self.app.settings.instance, ws_id)
            ports = [HTTP_PORT, *self.ports]
            try:
                socks = await asyncio.to_thread(_open, netns, ports)
            except BackendFailure as err:
                log.warning(
                    "metadata service not served in a workspace",
                    extra={"ctx": {"ws": ws_id, "error": err.message}},
                )
                return
            cookie = netns_cookie(socks[HTTP_PORT])
            if cookie is None:  # pragma: no cover - kernels before 5.14
                for s in socks.values():
                    s.close()
                log.warning("no SO_NETNS_COOKIE: the metadata service is off")
                return
            entry = _Listening(cookie)
            self.open[ws_id] = entry
            self.by_cookie[cookie] = ws_id
            entry.http = await asyncio.get_running_loop().create_server(
                self._http_protocol(entry), sock=socks.pop(HTTP_PORT)
            )
            for port, sock in socks.items():
                entry.servers[port] = await self._serve_port(ws_id, port, sock)

    def _http_protocol(self, entry: _Listening) -> Callable[[], asyncio.Protocol]:
        """The runner's aiohttp protocol per connection, at most MAX_CONNECTIONS at once."""
        server = self.runner.server if self.runner is not None else None
        assert server is not None

        def make() -> asyncio.Protocol:
            if entry.connections >= MAX_CONNECTIONS:
                return _Refused()
            return _Counted(server(), entry)

        return make

    async def _serve_port(self, ws_id: str, port: int, sock: socket.socket) -> asyncio.Server:
        factory = self.ports[port]
        ident = await self.lookup(ws_id)

        def make() -> asyncio.Protocol:
            if ident is None:
                raise ConnectionRefusedError
            return factory(ident)

        loop = asyncio.get_running_loop()
        return await loop.create_server(make, sock=sock)

    async def down(self, ws_id: str) -> None:
        async with self._lock:
            entry = self.open.pop(ws_id, None)
            if entry is None:
                return
            self.by_cookie.pop(entry.cookie, None)
            self._idents.pop(ws_id, None)
            self._buckets.pop(ws_id, None)
            if entry.http is not None:
                entry.http.close()
            for server in entry.servers.values():
                server.close()

    def add_port(self, port: int, factory: ProtocolFactory) -> None:
        inner_port(port)  # a port with no place inside is a bug of the caller: say so now
        self.ports[port] = factory
        for ws_id in list(self.open):
            tasks.spawn(self._add_port_to(ws_id, port), name=f"meta-port-{port}")

    async def _add_port_to(self, ws_id: str, port: int) -> None:
        netns = names.netns(self.app.settings.instance, ws_id)
        try:
            socks = await asyncio.to_thread(_open, netns, [HTTP_PORT, *self.ports], [port])
        except BackendFailure as err:
            log.warning(
                "metadata port not served in a workspace",
                extra={"ctx": {"ws": ws_id, "port": port, "error": err.message}},
            )
            return
        async with self._lock:
            entry = self.open.get(ws_id)
            if entry is None or port in entry.servers:
                socks[port].close()
                return
            entry.servers[port] = await self._serve_port(ws_id, port, socks[port])

    async def close(self) -> None:
        for ws_id in list(self.open):
            await self.down(ws_id)
        if self.runner is not None:
            await self.runner.cleanup()


@web.middleware
async def _identify(request: web.Request, handler: Any) -> web.StreamResponse:
    meta = request.app[META_KEY]
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    cookie = netns_cookie(sock) if sock is not None else None
    ws_id = meta.by_cookie.get(cookie) if cookie is not None else None
    if ws_id is None:
        return web.json_response({"error": "this workspace is not known to den"}, status=403)
    wait = meta.admit(ws_id)
    if wait:
        return web.json_response(
            {
                "error": f"more than {REQUESTS_PER_SECOND} requests a second from this "
                f"workspace; retry in {wait:.1f} s"
            },
            status=429,
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    ident = await meta.identity_of(ws_id)
    if ident is None:
        return web.json_response({"error": "this workspace is not known to den"}, status=403)
    request[_IDENT] = ident
    resp: web.StreamResponse = await handler(request)
    return resp


_metas: weakref.WeakKeyDictionary[App, Meta] = weakref.WeakKeyDictionary()


def get(app: App) -> Meta | None:
    return _metas.get(app)


_pending: weakref.WeakKeyDictionary[App, dict[int, ProtocolFactory]] = weakref.WeakKeyDictionary()


def add_port(app: App, port: int, factory: ProtocolFactory) -> None:
    """Serve ``factory(ident)`` (an asyncio.Protocol per connection) on
    169.254.169.254:``port`` in every running workspace and each one started
    from now on. May be called before or after the service starts."""
    meta = _metas.get(app)
    if meta is None:
        _pending.setdefault(app, {})[port] = factory
    else:
        meta.add_port(port, factory)


async def start(app: App) -> Meta:
    """Set up the service, follow the backend's starts and stops, and listen in
    every workspace that runs now (the daemon restarted under them)."""
    meta = Meta(app)
    meta.ports.update(_pending.pop(app, {}))
    await meta.setup()
    _metas[app] = meta
    # Served in the sandbox's network namespaces only: a microVM has a kernel of
    # its own, and no namespace den could listen in.
    backend = app.backend_for(SERVED_ON)
    backend.on_up.append(meta.up)
    backend.on_down.append(meta.down)
    async with app.sessions() as db:
        rows = (
            await db.execute(
                select(Workspace.id).where(
                    Workspace.state.in_(("running", "suspended")), Workspace.backend == SERVED_ON
                )
            )
        ).all()
    for (ws_id,) in rows:
        if backend.running(ws_id):
            await meta.up(ws_id)
    return meta


async def stop(app: App) -> None:
    meta = _metas.pop(app, None)
    if meta is not None:
        await meta.close()
