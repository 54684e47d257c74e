"""``/mcp``: MCP's streamable HTTP on den's aiohttp listeners.

The SDK's transport is ASGI; den serves aiohttp. A small adapter below hands
the SDK's session manager one aiohttp request as an ASGI call (the body
streamed in, the response — JSON or server-sent events — streamed out), so the
SDK keeps the whole protocol: sessions, SSE, resumption, both protocol eras.

Every request is authenticated before the SDK sees it (den tokens, and JWTs
when OAuth is on, as on /rpc); its caller rides in the ASGI scope, so a
session's calls always run as whoever sends each request. A session is bound
to the credential that opened it: the SDK compares the scope's ``user`` on
each request and answers 404 to anyone else.

On the unix socket a websocket at the same path carries stdio's JSON-RPC
lines instead, one connection one session, for ``den mcp``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
from aiohttp import WSMsgType, web
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared._context_streams import create_context_streams
from mcp.shared.message import SessionMessage

from den import tasks
from den.errors import DenError, QuotaExceeded, Unauthenticated
from den.mcp.tools import CALLER_KEY, build_server
from den.rpc.authlimit import AuthFailures
from den.rpc.registry import ANONYMOUS_TCP, Caller
from den.rpc.server import _error, _token_shaped, peer_uid, request_caller
from den.services.tokens import authenticate
from den.web.jwt import bearer_caller

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
AsgiApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]
# An idle session is closed after this long (the SDK's default is 30 minutes).
SESSION_IDLE = 3600.0
# Sessions one den user may hold open at once (all their credentials together):
# the SDK's own cap (10 000) is one for everyone, which one member opening
# sessions in a loop would fill for an hour.
SESSIONS_PER_USER = 64


class McpService:
    """One SDK session manager per daemon, started by the first request and
    stopped with den's background tasks."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.server = build_server(app)
        self.manager = StreamableHTTPSessionManager(
            app=self.server,
            max_request_body_size=app.settings.max_body_bytes,
            session_idle_timeout=SESSION_IDLE,
        )
        self.failures = AuthFailures(
            app.settings.api_max_auth_failures, app.settings.api_auth_failure_window
        )
        self._ready: asyncio.Event | None = None

    async def started(self) -> StreamableHTTPSessionManager:
        if self._ready is None:
            self._ready = ready = asyncio.Event()

            async def run() -> None:
                async with self.manager.run():
                    ready.set()
                    await asyncio.Event().wait()  # until den stops (tasks.cancel_all)

            tasks.spawn(run(), "mcp-sessions")
        await self._ready.wait()
        return self.manager


_services: weakref.WeakKeyDictionary[App, McpService] = weakref.WeakKeyDictionary()


def service(app: App) -> McpService:
    svc = _services.get(app)
    if svc is None:
        svc = _services[app] = McpService(app)
    return svc


def _unauthenticated() -> web.Response:
    err = Unauthenticated(
        "/mcp needs an identity: send 'Authorization: Bearer <token>' (`den token create`), "
        "or run `den mcp` on the daemon's host"
    )
    return _error(err, 401, {"WWW-Authenticate": 'Bearer realm="den"'})


def _principal(caller: Caller) -> AuthenticatedUser:
    """What the SDK binds a session to: the user and the credential (never its secret)."""
    token = AccessToken(
        token="",
        client_id=f"{caller.name}#{caller.user_id}",
        scopes=[],
        subject=f"{caller.via}:{caller.token_id or ''}",
    )
    return AuthenticatedUser(token)


async def handler(request: web.Request) -> web.StreamResponse:
    """``/mcp`` on den's HTTP listener and unix socket (``make_web_app``)."""
    from den.rpc.server import APP_KEY

    app: App = request.app[APP_KEY]  # type: ignore[assignment]
    caller = await request_caller(request)
    if isinstance(caller, web.StreamResponse):
        return caller
    if not caller.authenticated:
        return _unauthenticated()
    if peer_uid(request) is not None and request.headers.get("Upgrade", "").lower() == "websocket":
        return await _stdio_ws(app, request, caller)
    return await _serve(app, request, caller)


async def caddy_handler(request: web.Request) -> web.StreamResponse:
    """``/mcp`` at den's domain through Caddy (the gate app): a bearer credential
    only — the socket's peer is Caddy, never the client — from the address Caddy saw."""
    from den.web.dash.base import remote_of, surface

    app = surface(request).app
    svc = service(app)
    remote = remote_of(request)
    header = request.headers.get("Authorization")
    try:
        found = await bearer_caller(app, header) or await authenticate(app, header)
    except Unauthenticated as err:
        if not _token_shaped(header or ""):
            return _error(err, 401, {"WWW-Authenticate": 'Bearer realm="den"'})
        wait = svc.failures.retry_after(remote)
        svc.failures.failed(remote)
        if not wait:
            return _error(err, 401, {"WWW-Authenticate": 'Bearer realm="den"'})
        held = Unauthenticated(
            f"too many failed authentications from {remote}; retry in {wait} s",
            data={"retry_after": wait},
        )
        return _error(held, 429, {"Retry-After": str(wait)})
    except DenError as err:
        return _error(err, 500)
    caller = found or ANONYMOUS_TCP
    if not caller.authenticated:
        return _unauthenticated()
    return await _serve(app, request, dataclasses.replace(caller, addr=remote))


async def _serve(app: App, request: web.Request, caller: Caller) -> web.StreamResponse:
    manager = await service(app).started()
    principal = _principal(caller)
    if request.method == "POST" and "mcp-session-id" not in request.headers:
        # A request opening a session. The SDK keeps who opened each (the
        # principal's client_id is the user, whatever the credential).
        mine = principal.access_token.client_id
        held = sum(o["client_id"] == mine for o in manager._session_owners.values())
        if held >= SESSIONS_PER_USER:
            err = QuotaExceeded(
                f"{caller.name} has {held} MCP sessions open, the most a user may: end "
                "some (HTTP DELETE with their mcp-session-id); an idle one ends after "
                f"{SESSION_IDLE / 60:g} minutes"
            )
            return _error(err, 429)
    extra = {"user": principal, CALLER_KEY: caller}
    return await run_asgi(manager.handle_request, request, extra)


async def run_asgi(
    asgi: AsgiApp, request: web.Request, extra: dict[str, Any]
) -> web.StreamResponse:
    """Serve one aiohttp request with an ASGI app (HTTP only, no lifespan)."""
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": request.scheme,
        "path": "/mcp",
        "raw_path": b"/mcp",
        "root_path": "",
        "query_string": request.query_string.encode("latin-1"),
        "headers": [(k.lower(), v) for k, v in request.raw_headers],
        "client": (request.remote or "", 0),
        "server": None,
        **extra,
    }
    response: web.StreamResponse | None = None
    body_done = False
    finished = asyncio.Event()

    async def gone() -> None:
        # aiohttp does not cancel a handler whose client left: watch the transport
        # (an SSE stream the client dropped ends within a second).
        while not finished.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            await asyncio.sleep(1.0)

    async def receive() -> Message:
        nonlocal body_done
        if not body_done:
            chunk = await request.content.readany()
            if chunk:
                return {"type": "http.request", "body": chunk, "more_body": True}
            body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal response
        if message["type"] == "http.response.start":
            response = web.StreamResponse(status=message["status"])
            for key, value in message.get("headers", []):
                response.headers.add(key.decode("latin-1"), value.decode("latin-1"))
            return
        if message["type"] != "http.response.body" or response is None or finished.is_set():
            return
        try:
            if not response.prepared:
                await response.prepare(request)
            body = message.get("body", b"")
            if body:
                await response.write(body)
            if not message.get("more_body", False):
                await response.write_eof()
                finished.set()
        except (ConnectionError, RuntimeError):
            finished.set()  # the client left; what is left to send goes nowhere

    await asgi(scope, receive, send)
    finished.set()
    if response is None:
        return web.Response(status=500)
    if not response.prepared:
        await response.prepare(request)
        await response.write_eof()
    return response


async def _stdio_ws(app: App, request: web.Request, caller: Caller) -> web.StreamResponse:
    """MCP's stdio framing (one JSON-RPC message per text frame) on a websocket:
    ``den mcp`` relays its stdin and stdout here. Only on the unix socket, where
    the caller (peer credentials) is fixed for the connection's life."""
    ws = web.WebSocketResponse(max_msg_size=app.settings.max_body_bytes)
    await ws.prepare(request)
    server = build_server(app, caller)
    to_server, server_in = create_context_streams[SessionMessage | Exception](0)
    server_out, from_server = create_context_streams[SessionMessage](0)

    async def inbound() -> None:
        async with to_server:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                try:
                    message = types.jsonrpc_message_adapter.validate_json(msg.data, by_name=False)
                except ValueError as exc:  # pydantic's ValidationError: the server answers it
                    await to_server.send(exc)
                    continue
                await to_server.send(SessionMessage(message))

    async def outbound() -> None:
        async with from_server:
            async for item in from_server:
                text = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                await ws.send_str(text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(inbound)
        tg.start_soon(outbound)
        await server.run(server_in, server_out, server.create_initialization_options())
        tg.cancel_scope.cancel()
    await ws.close()
    return ws
