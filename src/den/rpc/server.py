"""HTTP transport of the API: ``POST /rpc`` on the unix socket and on TCP.

On the unix socket the caller is known by SO_PEERCRED; on TCP by a bearer
token. Both end in :func:`den.rpc.jsonrpc.handle_body`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from sqlalchemy import select

from den.db.models import User
from den.errors import DenError, Forbidden, InvalidRequest, Unauthenticated
from den.rpc.authlimit import AuthFailures
from den.rpc.jsonrpc import error_response, handle_body
from den.rpc.registry import ANONYMOUS_TCP, ANONYMOUS_UNIX, ROOT, Caller, Right
from den.services.tokens import TOKEN_PREFIX, authenticate
from den.web.jwt import bearer_caller

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
APP_KEY = web.AppKey("den_app", object)
FAILURES_KEY = web.AppKey("den_auth_failures", AuthFailures)
_PEERCRED = struct.Struct("3i")
JSON = "application/json"


def peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(creds)
    return int(uid)


async def unix_caller(app: App, uid: int) -> Caller:
    """uid 0 is admin; a den-<name> account is that user; anyone else is anonymous."""
    if uid == 0:
        return ROOT
    name = app.accounts.user_of_uid(uid)
    if name is None:
        return ANONYMOUS_UNIX
    async with app.sessions() as db:
        user = (await db.execute(select(User).where(User.name == name))).scalar_one_or_none()
    if user is None or user.uid != uid:
        return ANONYMOUS_UNIX
    right = Right.admin if user.role == "admin" else Right.write
    return Caller(user.name, user.role, right, "unix", user_id=user.id)


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON)


def _error(err: DenError, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(error_response(err)),
        status=status,
        content_type=JSON,
        headers=headers,
    )


def _token_shaped(header: str) -> bool:
    scheme, _, value = header.partition(" ")
    tid, _, secret = value.strip().removeprefix(TOKEN_PREFIX).partition("_")
    return (
        scheme.lower() == "bearer"
        and value.strip().startswith(TOKEN_PREFIX)
        and bool(tid and secret)
    )


async def request_caller(request: web.Request) -> Caller | web.Response:
    """The caller of a request (peer credentials on the unix socket, a bearer token
    on TCP), or the error response to send instead."""
    app: App = request.app[APP_KEY]  # type: ignore[assignment]
    uid = peer_uid(request)
    if uid is not None:
        return await unix_caller(app, uid)
    failures = request.app[FAILURES_KEY]
    addr = request.remote or "?"
    header = request.headers.get("Authorization")
    try:
        caller = await bearer_caller(app, header) or await authenticate(app, header)
        # The client's address: what `den ui allow --me` adds.
        return dataclasses.replace(caller or ANONYMOUS_TCP, addr=request.remote or "")
    except Unauthenticated as err:
        # Only a den token that fails counts: a malformed header is refused
        # before the database is asked, and says nothing about any secret. A
        # JWT tests no secret of den's either (and its key fetches are throttled).
        if not _token_shaped(request.headers.get("Authorization", "")):
            return _error(err, 401, {"WWW-Authenticate": "Bearer"})
        wait = failures.retry_after(addr)
        failures.failed(addr)
        if not wait:
            return _error(err, 401, {"WWW-Authenticate": "Bearer"})
        log.info("api authentication refused: address on hold", extra={"ctx": {"client": addr}})
        held = Unauthenticated(
            f"too many failed authentications from {addr}; retry in {wait} s",
            data={"retry_after": wait},
        )
        return _error(held, 429, {"Retry-After": str(wait)})
    except DenError as err:
        return _error(err, 500)


async def rpc_handler(request: web.Request) -> web.StreamResponse:
    app: App = request.app[APP_KEY]  # type: ignore[assignment]
    limit = app.settings.max_body_bytes
    too_big = InvalidRequest(
        "Invalid Request",
        data={"reason": f"the request body is larger than the limit of {limit} bytes"},
    )
    if request.content_length is not None and request.content_length > limit:
        return _error(too_big, 413)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error(too_big, 413)
    caller = await request_caller(request)
    if isinstance(caller, web.Response):
        return caller
    out = await handle_body(app, caller, body)
    if out is None:
        return web.Response(status=204)
    return _json(out)


async def openrpc_handler(request: web.Request) -> web.Response:
    from den.rpc.openrpc import document

    return _json(orjson.dumps(document()))


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text format, from the daemon's own registry, for admins only:
    it names every owner and workspace. Root or an admin on the unix socket, or
    an admin-right token on TCP (Prometheus: ``authorization: {credentials: TOKEN}``)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app: App = request.app[APP_KEY]  # type: ignore[assignment]
    caller = await request_caller(request)
    if isinstance(caller, web.Response):
        return caller
    if not caller.authenticated:
        err = Unauthenticated("/metrics needs an admin credential: a bearer token of an admin")
        return _error(err, 401, {"WWW-Authenticate": "Bearer"})
    if not caller.is_admin or caller.right < Right.admin:
        return _error(Forbidden("/metrics is for admins (a token with the admin right)"), 403)
    body = generate_latest(app.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_web_app(app: App) -> web.Application:
    from den.mcp import handler as mcp_handler
    from den.web import allow

    web_app = web.Application(
        client_max_size=app.settings.max_body_bytes,
        middlewares=[allow.middleware(app, allow.tcp_remote)],
    )
    web_app[APP_KEY] = app
    web_app[FAILURES_KEY] = AuthFailures(
        app.settings.api_max_auth_failures, app.settings.api_auth_failure_window
    )
    web_app.router.add_post("/rpc", rpc_handler)
    web_app.router.add_get("/openrpc.json", openrpc_handler)
    web_app.router.add_get("/metrics", metrics_handler)
    web_app.router.add_route("*", "/mcp", mcp_handler)  # MCP (den.mcp.http)
    from den.web.execws import exec_handler  # streaming exec (den.services.execstream)

    web_app.router.add_get("/v1/exec", exec_handler)
    from den.web import dash
    from den.web.dash.base import SURFACE, Surface
    from den.web.server import add_login_routes, ask_handler

    web_app.router.add_get("/_den/ask/{secret}", ask_handler)
    # The dashboard, and signing a browser in to it, on this listener too.
    web_app[SURFACE] = Surface(app, via_caddy=False)
    add_login_routes(web_app.router, "")
    dash.add_routes(web_app.router, "")
    return web_app


def prepare_socket(path: str, group: str, mode: int) -> socket.socket:
    """Bind the API socket with its owner group and mode set before anyone connects."""
    import grp

    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale socket of a dead daemon
        else:
            probe.close()
            raise SystemExit(
                f"den: another daemon is listening on {path}; stop it or use --instance"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chown(path, 0, grp.getgrnam(group).gr_gid)
    os.chmod(path, mode)
    sock.listen(1024)
    sock.setblocking(False)
    return sock
