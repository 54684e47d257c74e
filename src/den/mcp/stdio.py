"""``den mcp``: MCP over stdin/stdout, served by the daemon.

A relay, not a second server: each line of stdin (one JSON-RPC message, MCP's
stdio framing) goes as a text frame to the websocket at ``/mcp`` on the
daemon's unix socket, and each frame back becomes a line of stdout. The daemon
knows the caller by the socket's peer credentials (whoever runs ``den mcp``)
and serves the session with the same tools, rights and audit as over HTTP;
the relay knows nothing of MCP, so it follows any protocol version the client
and daemon agree on.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp

# A message larger than this is refused by the daemon anyway (max_body_bytes).
MAX_LINE = 64 << 20


async def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def relay(socket_path: str) -> int:
    loop = asyncio.get_running_loop()
    stdin = await _stdin_lines(loop)
    out = sys.stdout.buffer
    connector = aiohttp.UnixConnector(path=socket_path)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            ws = await http.ws_connect("http://den/mcp", max_msg_size=MAX_LINE)
        except aiohttp.WSServerHandshakeError as exc:
            print(f"den mcp: the daemon refused: {exc.status} {exc.message}", file=sys.stderr)
            return 4 if exc.status in (401, 403) else 1
        except aiohttp.ClientError as exc:
            print(f"den mcp: cannot reach the daemon at {socket_path}: {exc}", file=sys.stderr)
            return 69

        async def up() -> None:
            while line := await stdin.readline():
                if line.strip():
                    await ws.send_str(line.decode(errors="replace").rstrip("\r\n"))
            await ws.close()  # stdin closed: the client is done

        sender = asyncio.create_task(up())
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                out.write(msg.data.encode() + b"\n")
                out.flush()
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    return 0


def main(socket_path: str) -> int:
    try:
        return asyncio.run(relay(socket_path))
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
