"""HTTP transport of the API: ``POST /rpc`` on the unix socket and on TCP.

On the unix socket the caller is known by SO_PEERCRED; on TCP by a bearer
token. Both end in :func:`den.rpc.jsonrpc.handle_body`.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from sqlalchemy import select

from den.db.models import User
from den.errors import DenError, InvalidRequest, Unauthenticated
from den.rpc.jsonrpc import error_response, handle_body
from den.rpc.registry import ANONYMOUS_TCP, ANONYMOUS_UNIX, ROOT, Caller, Right
from den.services.tokens import authenticate

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
APP_KEY = web.AppKey("den_app", object)
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


async def rpc_handler(request: web.Request) -> web.StreamResponse:
    app: App = request.app[APP_KEY]  # type: ignore[assignment]
    limit = app.settings.max_body_bytes
    too_big = InvalidRequest(
        "Invalid Request",
        data={"reason": f"the request body is larger than the limit of {limit} bytes"},
    )
    if request.content_length is not None and request.content_length > limit:
        return _json(orjson.dumps(error_response(too_big)), 413)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _json(orjson.dumps(error_response(too_big)), 413)
    uid = peer_uid(request)
    try:
        if uid is not None:
            caller = await unix_caller(app, uid)
        else:
            caller = await authenticate(app, request.headers.get("Authorization")) or ANONYMOUS_TCP
    except Unauthenticated as err:
        return _json(orjson.dumps(error_response(err)), 401)
    except DenError as err:
        return _json(orjson.dumps(error_response(err)), 500)
    out = await handle_body(app, caller, body)
    if out is None:
        return web.Response(status=204)
    return _json(out)


async def openrpc_handler(request: web.Request) -> web.Response:
    from den.rpc.openrpc import document

    return _json(orjson.dumps(document()))


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text format, from the daemon's own registry."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    app: App = request.app[APP_KEY]  # type: ignore[assignment]
    body = generate_latest(app.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_web_app(app: App) -> web.Application:
    web_app = web.Application(client_max_size=app.settings.max_body_bytes)
    web_app[APP_KEY] = app
    web_app.router.add_post("/rpc", rpc_handler)
    web_app.router.add_get("/openrpc.json", openrpc_handler)
    web_app.router.add_get("/metrics", metrics_handler)
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
