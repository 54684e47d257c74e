"""The UI allow-list: which client addresses may reach den's dashboard and API
over TCP (``den ui allow``, den.services.ui).

An empty list means every address may. The unix socket is always trusted (its
callers are known by their uid), and so is Caddy's own certificate question
(``/_den/ask/{secret}``): it comes from Caddy, not from a client. Through
Caddy, only den's own pages at the domain itself are checked, against the
address Caddy saw (``X-Den-Remote``); workspace URLs have their own access
rules (sharing) and are not affected, nor is signing a browser in for them.

The list is read from the database once and kept in memory until a ``ui.*``
method changes it (the daemon is one process), so every request is checked
against the current list without a query.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from sqlalchemy import select

from den.db.models import UiAllow
from den.errors import Forbidden, InvalidParams
from den.rpc.jsonrpc import error_response
from den.web import pages
from den.web.caddy_config import PAGES

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
RemoteOf = Callable[[web.Request], str | None]
# Answered in JSON (a JSON-RPC error object), not as a page: the API, MCP
# (here and through Caddy) and streaming exec.
API_PATHS = frozenset({"/rpc", "/openrpc.json", "/metrics", "/mcp", PAGES + "/mcp", "/v1/exec"})
ASK_ROUTE = "/_den/ask/{secret}"
SIGN_IN = frozenset({PAGES + "/_den/login", PAGES + "/_den/logout"})

_lists: WeakKeyDictionary[App, tuple[Network, ...]] = WeakKeyDictionary()
_generation: WeakKeyDictionary[App, int] = WeakKeyDictionary()


def address(text: str) -> Address | None:
    """A client address as the list compares it: an IPv4-mapped IPv6 address
    (``::ffff:127.0.0.2``, from a dual-stack socket) is the IPv4 address, a zone
    (``%eth0``) is dropped. None: not an address."""
    try:
        ip = ipaddress.ip_address(text.strip().partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def network(text: str, field: str = "addr") -> str:
    """``text`` as the list stores it (an address or a CIDR network, host bits
    clear, mapped IPv4 as IPv4), or a -32602 naming ``field``."""
    raw = text.strip()
    ip = address(raw) if "/" not in raw else None
    if ip is not None:
        return str(ip)
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError:
        try:
            loose = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise InvalidParams(
                f"{raw[:64]!r} is not an IP address or CIDR network "
                "(e.g. 192.0.2.7, 10.1.0.0/16 or 2001:db8::/32)",
                field=field,
            ) from None
        raise InvalidParams(
            f"{raw[:64]!r} has host bits set: write the network ({loose}) or one address",
            field=field,
        ) from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        mapped = net.network_address.ipv4_mapped
        net = ipaddress.ip_network(f"{mapped}/{max(net.prefixlen - 96, 0)}")
    if net.num_addresses == 1:
        return str(net.network_address)
    return str(net)


def invalidate(app: App) -> None:
    """The list changed: the next request reads it again."""
    _generation[app] = _generation.get(app, 0) + 1
    _lists.pop(app, None)


async def networks(app: App) -> tuple[Network, ...]:
    """The allow-list (empty: open), from memory when nothing changed it."""
    cached = _lists.get(app)
    if cached is not None:
        return cached
    gen = _generation.get(app, 0)
    async with app.sessions() as db:
        rows = (await db.execute(select(UiAllow.network))).scalars().all()
    nets = tuple(ipaddress.ip_network(r) for r in rows)
    # A change while this was read: keep nothing, the next request reads again.
    if _generation.get(app, 0) == gen:
        _lists[app] = nets
    return nets


async def permitted(app: App, addr: str) -> bool:
    """May a client at ``addr`` use the dashboard and API over TCP?"""
    nets = await networks(app)
    if not nets:
        return True
    ip = address(addr)
    return ip is not None and any(ip in n for n in nets)


def refusal(request: web.Request, addr: str) -> web.Response:
    """403: what is refused and how an admin lets the address in."""
    shown = addr[:64] or "this address"
    err = Forbidden(
        f"{shown} is not on den's UI allow-list; an admin lets it in with "
        f"`den ui allow {addr[:64] or 'ADDR'}` (or opens it to every address with `den ui open`), "
        "over the unix socket or den's ssh shell"
    )
    if request.path in API_PATHS:
        body = orjson.dumps(error_response(err))
        return web.Response(body=body, status=403, content_type="application/json")
    text = (
        pages.para(f"{shown} is not on den's UI allow-list, so den's dashboard is closed to it.")
        + pages.para("An admin lets it in with ")
        + pages.code(f"den ui allow {addr[:64] or 'ADDR'}")
        + pages.para("or lets every address in again with ")
        + pages.code("den ui open")
    )
    return pages.page("Not allowed from this address", text, 403)


def middleware(app: App, remote_of: RemoteOf) -> Middleware:
    """An aiohttp middleware that refuses clients the list does not name.

    ``remote_of(request)``: the client's address, or None for a request the list
    does not apply to."""

    @web.middleware
    async def allow_list(request: web.Request, handler: Handler) -> web.StreamResponse:
        remote = remote_of(request)
        if remote is None or await permitted(app, remote):
            return await handler(request)
        # Debug only: a refused scanner must not fill the log.
        log.debug("ui refused", extra={"ctx": {"client": remote[:64], "path": request.path[:200]}})
        return refusal(request, remote)

    return allow_list


def tcp_remote(request: web.Request) -> str | None:
    """The client of den's HTTP listener (None: the unix socket, or Caddy's question)."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family == socket.AF_UNIX:
        return None
    resource = request.match_info.route.resource
    if resource is not None and resource.canonical == ASK_ROUTE:
        return None
    return request.remote or ""


def caddy_remote(request: web.Request) -> str | None:
    """The client Caddy saw, for den's own pages at the domain (None: workspace URLs,
    which Caddy asks the gate about, and Caddy's error pages for them)."""
    path = request.path
    # Signing in only sets the cookie workspace URLs take (they are not the UI's).
    if not path.startswith(PAGES) or path in SIGN_IN:
        return None
    return request.headers.get("X-Den-Remote", "")
