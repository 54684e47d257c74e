"""One forwarded connection: a socket inside a workspace (TCP or Unix) joined
to an SSH channel, for ``ssh -L`` and ``ssh -R`` of ports and paths and for the
agent socket.

Bytes move both ways with flow control (a side that cannot keep up pauses the
other's reading), an EOF half-closes one way only, and either side closing
closes the other. Nothing is read from the socket before its channel is open
(:func:`den.ssh.limits.hold_until_open`), and the bridge keeps its
:class:`den.ssh.limits.Ticket` until both ends are gone.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh.channel import SSHChannel

from den import tasks
from den.ssh import limits

if TYPE_CHECKING:
    from den.ssh.link import Link

log = logging.getLogger(__name__)

# Opens a channel to the client whose data goes to the session the factory makes.
OpenChannel = Callable[[Callable[[], "Bridge"]], Awaitable[Any]]


class SocketEnd(asyncio.Protocol):
    """The workspace's end: one connection on a socket inside."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.transport: asyncio.Transport | None = None
        # Read before the channel opened (one read at most: reading is held); None: EOF.
        self.early: list[bytes | None] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.bridge.ticket.close_socket = transport.abort
        limits.hold_until_open(transport, lambda: self.bridge.chan is None)

    def data_received(self, data: bytes) -> None:
        self.bridge.counted(self.bridge.link.count_out, data)
        if self.bridge.chan is not None:
            self.bridge.chan.write(data)
        else:
            self.early.append(data)
            if self.transport is not None:
                limits.hold(self.transport)

    def eof_received(self) -> bool:
        if self.eof:  # again after a resume: told once
            return True
        self.eof = True
        if self.bridge.chan is not None:
            self.bridge.chan.write_eof()
        else:
            self.early.append(None)
        return True  # half-closed: the other direction may still flow

    def pause_writing(self) -> None:
        if self.bridge.chan is not None:
            self.bridge.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.bridge.chan is not None:
            self.bridge.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # nothing more is written to it
        if self.bridge.chan is not None:
            self.bridge.chan.close()
        self.bridge.ticket.ended("socket")


class Bridge(asyncssh.SSHTCPSession[bytes], asyncssh.SSHUNIXSession[bytes]):
    """The client's end: one SSH channel (TCP or Unix), and the socket it is joined to."""

    def __init__(self, link: Link, ws_id: str, ticket: limits.Ticket) -> None:
        self.link = link
        self.ws_id = ws_id
        self.ticket = ticket
        self.chan: SSHChannel[bytes] | None = None
        self.end = SocketEnd(self)

    def counted(self, count: Callable[[int], None], data: bytes) -> None:
        """Bytes moved either way count, and make the workspace active."""
        count(len(data))
        self.link.app.activity.touch(self.ws_id, "forward")

    def connection_made(self, chan: SSHChannel[bytes]) -> None:
        self.chan = chan
        t = self.end.transport
        if t is None or t.is_closing():  # given up inside before the client confirmed
            chan.close()
            return
        for data in self.end.early:
            if data is None:
                chan.write_eof()
            else:
                chan.write(data)
        self.end.early.clear()
        t.resume_reading()

    def abort_socket(self) -> None:
        if self.end.transport is not None:
            self.end.transport.abort()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.counted(self.link.count_in, data)
        if self.end.transport is not None:
            self.end.transport.write(data)

    def eof_received(self) -> bool:
        t = self.end.transport
        if t is not None and t.can_write_eof():
            t.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.end.transport is not None:
            self.end.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.end.transport is not None:
            self.end.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.end.transport is not None:
            self.end.transport.close()
        self.ticket.ended("channel")


async def attach(link: Link, ws_id: str, sock: socket.socket, ticket: limits.Ticket) -> Bridge:
    """A bridge from ``sock`` (connected, non-blocking) to a channel still to
    open: the session to give asyncssh. ``sock`` and ``ticket`` are the bridge's
    (closed and released if this fails)."""
    bridge = Bridge(link, ws_id, ticket)
    try:
        await asyncio.get_running_loop().create_connection(lambda: bridge.end, sock=sock)
    except BaseException:
        sock.close()
        ticket.release()
        raise
    return bridge


async def relay_out(
    link: Link, ws_id: str, sock: socket.socket, open_channel: OpenChannel, ticket: limits.Ticket
) -> None:
    """Bridge a connection accepted inside the workspace to a new channel to the client.

    The socket is closed if the client has not confirmed the channel within
    ``ssh_forward_open_seconds``; the bridge keeps its place until the client answers (a late
    channel is closed at once) or its connection ends.
    """
    bridge = await attach(link, ws_id, sock, ticket)
    opening = asyncio.ensure_future(open_channel(lambda: bridge))
    try:
        done, _ = await asyncio.wait({opening}, timeout=link.app.settings.ssh_forward_open_seconds)
        if not done:
            log.info("ssh: a forwarded channel was not confirmed in time: closed inside")
            bridge.abort_socket()
        await opening
    except (asyncssh.Error, OSError) as exc:  # the client could not reach its side
        log.info("ssh: the client refused a forwarded channel: %s", exc)
        bridge.abort_socket()
        ticket.ended("channel")


async def serve(
    listener: socket.socket, accepted: Callable[[socket.socket], None], name: str
) -> None:
    """Accept on ``listener`` until cancelled, handing each connection to ``accepted``."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, _ = await loop.sock_accept(listener)
        except OSError as exc:  # EMFILE and the like: do not spin, nor flood the log
            limits.quietly(f"accept:{name}", f"accept on {name} failed: {exc}")
            await asyncio.sleep(1)
            continue
        conn.setblocking(False)
        accepted(conn)


class Listener(asyncssh.SSHListener):
    """Sockets listening inside a workspace for one ``ssh -R`` request; each
    connection to them is bridged to a new channel to the client, counted under
    :data:`den.ssh.limits.RELAYS_PER_LISTENER` (one past it is closed at once)."""

    def __init__(self, link: Link, ws_id: str, what: str) -> None:
        super().__init__()
        self.link = link
        self.ws_id = ws_id
        self.gate = limits.Gate(limits.RELAYS_PER_LISTENER, what)
        self.socks: list[socket.socket] = []
        self.tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()

    def open_channel(self, conn: socket.socket) -> OpenChannel:
        """How a channel for ``conn``, accepted inside, is opened to the client."""
        raise NotImplementedError

    def start(self, socks: list[socket.socket]) -> None:
        for sock in socks:
            self.socks.append(sock)
            self.tasks.append(
                tasks.spawn(serve(sock, self._accepted, self.gate.what), name="ssh-listener")
            )

    def _accepted(self, conn: socket.socket) -> None:
        ticket = None if self.link.revoked else limits.admit(self.link, self.gate)
        if ticket is None:  # past a limit: closed at once, costing nothing
            conn.close()
            return
        bridged = relay_out(self.link, self.ws_id, conn, self.open_channel(conn), ticket)
        tasks.spawn(bridged, name="ssh-forward-in")

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for sock in self.socks:
            sock.close()
        self.tasks, self.socks = [], []
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
