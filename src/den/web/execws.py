"""``GET /v1/exec``: streaming exec over a websocket (den.services.execstream).

Authenticated as ``/rpc`` is (peer credentials on the unix socket, a bearer
token on TCP), before the upgrade. The framing is documented once, in the
description of ``workspace.exec_stream`` (rpc.discover):

- the client's first frame: text, the params as a JSON object;
- binary frames: one channel byte, then data (0 stdin from the client, 1
  stdout and 2 stderr from den);
- text frames, JSON: the client's ``{"eof": true}`` and ``{"signal": "INT"}``;
  den's last, ``{"exit_code": N, "signal": null|"KILL", "timed_out": B}`` or
  ``{"error": {...}}``.

Backpressure both ways: output is read from the command only once the last
frame went into the socket's buffer (aiohttp's ``send_bytes`` waits for it to
drain), and the next client frame is only read once its stdin took the last.
A websocket that closes kills the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import WSMsgType, web

from den.errors import DenError, InternalError, InvalidParams, Unauthenticated
from den.rpc.server import APP_KEY, _error, request_caller
from den.services.execstream import RunningExec, open_exec

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
MAX_FRAME = 1 << 20  # a client frame (params, or stdin data)
FIRST_FRAME_SECONDS = 30.0
STDIN, STDOUT, STDERR = 0, 1, 2


def _signal_of(name: Any) -> int:
    if isinstance(name, str):
        with contextlib.suppress(KeyError):
            return int(signal.Signals["SIG" + name.upper().removeprefix("SIG")])
    raise InvalidParams(f"signal: {str(name)[:20]!r} is not a signal name (INT, TERM, KILL...)")


async def exec_handler(request: web.Request) -> web.StreamResponse:
    app: App = request.app[APP_KEY]  # type: ignore[assignment]
    caller = await request_caller(request)
    if isinstance(caller, web.Response):
        return caller
    if not caller.authenticated:
        err = Unauthenticated(
            "/v1/exec needs an identity: the unix socket as root or a den user's account, "
            "or 'Authorization: Bearer <token>'"
        )
        return _error(err, 401, {"WWW-Authenticate": "Bearer"})
    sock = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=30.0)
    await sock.prepare(request)
    running: RunningExec | None = None
    try:
        params = await _first_frame(sock)
        running = await open_exec(app, caller, params)
        await _relay(request, sock, running)
    except DenError as err:
        await _send_json(sock, {"error": err.to_error()})
    except Exception:
        log.exception("exec websocket failed", extra={"ctx": {"user": caller.name}})
        await _send_json(sock, {"error": InternalError("Internal error").to_error()})
    finally:
        if running is not None:
            await running.close()
        await sock.close()
    return sock


async def _first_frame(sock: web.WebSocketResponse) -> Any:
    try:
        msg = await sock.receive(timeout=FIRST_FRAME_SECONDS)
    except TimeoutError:
        raise InvalidParams(f"no params within {FIRST_FRAME_SECONDS:g} s") from None
    if msg.type != WSMsgType.TEXT:
        raise InvalidParams("the first frame must be text: the params as a JSON object")
    try:
        params = orjson.loads(msg.data)
    except orjson.JSONDecodeError:
        raise InvalidParams("the first frame is not JSON") from None
    if not isinstance(params, dict):
        raise InvalidParams("the params must be a JSON object")
    return params


async def _send_json(sock: web.WebSocketResponse, data: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await sock.send_str(orjson.dumps(data).decode())


async def _relay(request: web.Request, sock: web.WebSocketResponse, run: RunningExec) -> None:
    """Output to the socket and the socket's frames to the command, until the command
    ended and its output went out (then the exit frame), or the client went away."""
    inbound = asyncio.ensure_future(_from_client(sock, run))
    outbound = asyncio.ensure_future(_to_client(sock, run))
    gone = asyncio.ensure_future(_connection_lost(request))
    try:
        done, _ = await asyncio.wait({inbound, outbound, gone}, return_when=asyncio.FIRST_COMPLETED)
        # A send that failed: the client went away (ConnectionResetError).
        if outbound in done and not isinstance(outbound.exception(), ConnectionError):
            outbound.result()
            ended = await run.wait()
            name = signal.Signals(ended.signal).name[3:] if ended.signal else None
            await _send_json(
                sock,
                {"exit_code": ended.exit_code, "signal": name, "timed_out": run.timed_out},
            )
        # Else the client went away: the caller's close() kills the command.
    finally:
        for task in (inbound, outbound, gone):
            task.cancel()
        await asyncio.gather(inbound, outbound, gone, return_exceptions=True)


async def _connection_lost(request: web.Request) -> None:
    """Returns once the client's connection is gone. Needed besides reading the socket:
    while the command does not read its stdin, the client's frames are not read
    either (backpressure), and a close frame waits behind them."""
    while request.transport is not None and not request.transport.is_closing():
        await asyncio.sleep(1.0)


async def _to_client(sock: web.WebSocketResponse, run: RunningExec) -> None:
    while (chunk := await run.read()) is not None:
        channel, data = chunk
        await sock.send_bytes(bytes((channel,)) + data)


async def _from_client(sock: web.WebSocketResponse, run: RunningExec) -> None:
    """Returns when the socket closes (or fails)."""
    async for msg in sock:
        if msg.type == WSMsgType.BINARY:
            data: bytes = msg.data
            if data[:1] == bytes((STDIN,)) and len(data) > 1:
                await run.write(data[1:])
        elif msg.type == WSMsgType.TEXT:
            try:
                ctl = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(ctl, dict):
                continue
            if ctl.get("eof"):
                await run.close_stdin()
            if "signal" in ctl:
                try:
                    run.signal(_signal_of(ctl["signal"]))
                except InvalidParams as err:
                    await _send_json(sock, {"warning": err.message})
