"""``den exec``: the command's output printed as it arrives, over den's exec websocket
(``GET /v1/exec``, framing in ``workspace.exec_stream``'s description).

Over the unix socket (the caller known by its peer credentials) or the API URL
with a token, as the rest of the CLI talks to /rpc. stdin is forwarded when it
is not a terminal (a pipe or a file); Ctrl-C, SIGTERM and SIGHUP go to the
command; a second Ctrl-C closes the websocket, which kills it. The exit code
is the command's (128+N when signal N ended it). ``den exec --json`` still
makes the non-streaming ``workspace.exec`` call, for scripts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import signal
import sys
import threading
from typing import Any, BinaryIO
from urllib.parse import urlsplit, urlunsplit

import orjson

from den.cli.client import ConnectError, RpcError

CHUNK = 1 << 16
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STDIN = b"\x00"


def ws_url(url: str | None) -> str:
    """The websocket URL of ``/v1/exec``: under the API URL, or on the unix socket."""
    if not url:
        return "http://localhost/v1/exec"
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/v1/exec", "", ""))


async def stream(
    params: dict[str, Any],
    *,
    socket_path: str | None = None,
    url: str | None = None,
    token: str | None = None,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    forward_signals: bool = False,
) -> dict[str, Any]:
    """Run ``params`` (workspace.exec_stream's) and copy its output as it comes; returns
    den's last frame (``exit_code``, ``signal``, ``timed_out``). Raises RpcError for
    den's error frame, ConnectError when den cannot be reached."""
    import aiohttp

    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
    connector = aiohttp.UnixConnector(path=socket_path) if not url and socket_path else None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(connector=connector) as session:
        try:
            sock = await session.ws_connect(ws_url(url), headers=headers, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise RpcError(
                    -32006, "den refused the credentials (exec needs an identity)"
                ) from None
            raise ConnectError(f"den refused the exec websocket: HTTP {exc.status}") from None
        except (aiohttp.ClientConnectionError, FileNotFoundError, OSError) as exc:
            raise ConnectError(f"cannot reach den ({exc}); is `den serve` running?") from None
        async with sock:
            await sock.send_str(orjson.dumps(params).decode())
            feeder = asyncio.ensure_future(_feed(sock, stdin))
            loop = asyncio.get_running_loop()
            interrupts = 0
            sends: list[asyncio.Future[Any]] = []  # referenced until the end

            def forward(sig: signal.Signals) -> None:
                nonlocal interrupts
                interrupts += sig == signal.SIGINT
                if interrupts > 1:  # a second Ctrl-C: give up on it (den kills it)
                    sends.append(asyncio.ensure_future(sock.close()))
                    return
                text = orjson.dumps({"signal": sig.name[3:]}).decode()
                sends.append(asyncio.ensure_future(sock.send_str(text)))

            if forward_signals:
                for sig in FORWARDED:
                    loop.add_signal_handler(sig, forward, sig)
            try:
                return await _receive(sock, out, err)
            finally:
                if forward_signals:
                    for sig in FORWARDED:
                        loop.remove_signal_handler(sig)
                feeder.cancel()
                with contextlib.suppress(BaseException):
                    await feeder


async def _feed(sock: Any, stdin: BinaryIO | None) -> None:
    """Forward ``stdin`` until its end, then say end of input.

    Read by a daemon thread (a file, a pipe or a socket alike; the event loop
    takes no regular file), a few chunks ahead at most: a thread of the default
    executor would keep the CLI from exiting while stdin stays open.
    """
    if stdin is not None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes] = asyncio.Queue(4)
        fd = stdin.fileno()

        def pump() -> None:
            data = b"-"
            while data:
                try:
                    data = os.read(fd, CHUNK)
                except OSError:
                    data = b""
                try:
                    asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
                except (RuntimeError, concurrent.futures.CancelledError):
                    return  # the loop is gone: the command ended

        threading.Thread(target=pump, name="den-exec-stdin", daemon=True).start()
        while data := await queue.get():
            await sock.send_bytes(STDIN + data)
    await sock.send_str('{"eof": true}')


async def _receive(sock: Any, out: BinaryIO, err: BinaryIO) -> dict[str, Any]:
    import aiohttp

    async for msg in sock:
        if msg.type == aiohttp.WSMsgType.BINARY:
            data: bytes = msg.data
            target = out if data[:1] == b"\x01" else err
            target.write(data[1:])
            target.flush()
        elif msg.type == aiohttp.WSMsgType.TEXT:
            frame = orjson.loads(msg.data)
            if "error" in frame:
                e = frame["error"]
                raise RpcError(e.get("code", 0), e.get("message", ""), e.get("data"))
            if "exit_code" in frame:
                return dict(frame)
        elif msg.type == aiohttp.WSMsgType.ERROR:
            break
    raise ConnectError("den closed the exec websocket before the command's end")


def run(params: dict[str, Any], socket_path: str | None, url: str | None, token: str | None) -> int:
    """``den exec`` streaming: the command's exit code (for the CLI's own exit)."""
    text = params.pop("stdin", None)
    stdin: BinaryIO | None = None
    if text is not None:
        stdin = _text_input(str(text))
    elif not sys.stdin.isatty():
        stdin = sys.stdin.buffer
    end = asyncio.run(
        stream(
            params,
            socket_path=socket_path,
            url=url,
            token=token,
            stdin=stdin,
            forward_signals=True,
        )
    )
    if end.get("timed_out"):
        sys.stderr.write("den: the command was killed at its --timeout\n")
    return int(end.get("exit_code", 1))


def _text_input(text: str) -> BinaryIO:
    """``--stdin TEXT`` as a readable pipe (written by a thread: it may exceed a pipe's size)."""
    r, w = os.pipe()
    data = text.encode()

    def write() -> None:
        with contextlib.suppress(OSError), os.fdopen(w, "wb") as f:
            f.write(data)

    threading.Thread(target=write, daemon=True).start()
    return os.fdopen(r, "rb")


def from_cli(ctx: Any, params: dict[str, Any]) -> int:
    """``den exec`` (typer context ``ctx``) with the CLI's connection settings and errors."""
    from den.cli.main import EXIT_CODES, State, fail

    state = ctx.find_object(State)
    assert state is not None
    socket_path = None
    if not state.url:
        socket_path = state.client().socket_path
    try:
        return run(dict(params), socket_path, state.url, state.token)
    except RpcError as exc:
        fail(str(exc), EXIT_CODES.get(exc.code, 1))
    except ConnectError as exc:
        fail(str(exc), 69)
    return 1
