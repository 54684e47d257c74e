"""Unix sockets inside a workspace, over SSH: ``ssh -L LOCAL:/path/in/ws.sock``
(direct-streamlocal), ``ssh -R /path/in/ws.sock:LOCAL`` (streamlocal-forward),
and the relay the agent socket (:mod:`den.ssh.agent`) uses too.

Every socket at a workspace path is made inside the workspace by
:mod:`den.ssh.socket_worker` and its fd handed back: the host never resolves
a path the workspace controls. The daemon then only moves bytes between the
socket and an SSH channel.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh.channel import SSHChannel

from den import tasks
from den.errors import BackendFailure, DenError, InvalidParams
from den.services.account import ROOT, login_account
from den.ssh import join
from den.ssh.session import SPAWN_ENV
from den.ssh.target import Ready, as_root, ready

if TYPE_CHECKING:
    from den.app import App
    from den.ssh.inside import Account
    from den.ssh.link import Link

log = logging.getLogger(__name__)
WORKER_SECONDS = 15.0
MAX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL

# Opens a channel to the client whose data goes to the session the factory makes.
OpenChannel = Callable[[Callable[[], asyncssh.SSHUNIXSession[bytes]]], Awaitable[Any]]


def check_path(path: str) -> None:
    """A path a Unix socket can have (raises InvalidParams naming the limit)."""
    if not path or "\0" in path:
        raise InvalidParams("the socket path must be non-empty, with no NUL byte")
    if len(path.encode()) > MAX_PATH:
        raise InvalidParams(f"the socket path is longer than {MAX_PATH} bytes")


async def inside_socket(
    app: App,
    ws: Ready,
    ids: str,
    op: str,
    path: str,
    cwd: str = "/",
    owner: str | None = None,
    replace: bool = False,
    make_parent: bool = False,
) -> socket.socket:
    """A socket bound and listening (``op`` "listen") or connected ("connect")
    at ``path`` inside ``ws``, made there as ``ids`` (UID:GID inside)."""
    check_path(path)
    backend = app.backend
    init = backend.crun.init_process(backend.cid(ws.ws_id))
    if init is None:
        raise BackendFailure("the workspace has no running init")
    argv = join.argv(
        "den.ssh.socket_worker",
        init,
        ids,
        backend.cgroup(ws.ws_id),
        backend.bundle(ws.ws_id),
    )
    opts = ["--cwd", cwd]
    if owner:
        opts += ["--owner", owner]
    if replace:
        opts.append("--replace")
    if make_parent:
        opts.append("--make-parent")
    argv += [*opts, op, "--", path]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    with ours:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=theirs.fileno(),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=SPAWN_ENV,
            )
        finally:
            theirs.close()
        try:
            _, err = await asyncio.wait_for(proc.communicate(), WORKER_SECONDS)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise BackendFailure(f"the workspace did not {op} {path} in time") from None
        ours.setblocking(False)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ours, 1024, 1)
        except BlockingIOError:
            msg, fds = b"", []
    if msg == b"ok" and len(fds) == 1:
        sock = socket.socket(fileno=fds[0])
        sock.setblocking(False)
        return sock
    for fd in fds:
        os.close(fd)
    why = msg.decode(errors="replace") or err.decode(errors="replace").strip()[-300:]
    raise BackendFailure(why or f"the socket worker failed ({proc.returncode})")


class _Socket(asyncio.Protocol):
    """The workspace's side of a relay: one connection on a Unix socket."""

    def __init__(self, side: _Channel) -> None:
        self.side = side
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes | None] = []  # before the channel is open; None: EOF

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.side.link.count_out(len(data))
        if self.side.chan is not None:
            self.side.chan.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        if self.side.chan is not None:
            self.side.chan.write_eof()
        else:
            self.early.append(None)
        return True

    def pause_writing(self) -> None:
        if self.side.chan is not None:
            self.side.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.side.chan is not None:
            self.side.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.side.chan is not None:
            self.side.chan.close()


class _Channel(asyncssh.SSHUNIXSession[bytes]):
    """The client's side of a relay: one SSH channel."""

    def __init__(self, link: Link, ws_id: str) -> None:
        self.link = link
        self.ws_id = ws_id
        self.chan: SSHChannel[bytes] | None = None
        self.sock: _Socket | None = None

    def connection_made(self, chan: asyncssh.SSHUNIXChannel[bytes]) -> None:
        self.chan = chan
        if self.sock is not None:
            for data in self.sock.early:
                if data is None:
                    chan.write_eof()
                else:
                    chan.write(data)
            self.sock.early.clear()

    def _transport(self) -> asyncio.Transport | None:
        return self.sock.transport if self.sock is not None else None

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.link.count_in(len(data))
        self.link.app.activity.touch(self.ws_id, "forward")
        t = self._transport()
        if t is not None:
            t.write(data)

    def eof_received(self) -> bool:
        t = self._transport()
        if t is not None and t.can_write_eof():
            t.write_eof()
        return True

    def pause_writing(self) -> None:
        t = self._transport()
        if t is not None:
            t.pause_reading()

    def resume_writing(self) -> None:
        t = self._transport()
        if t is not None:
            t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        t = self._transport()
        if t is not None:
            t.close()


async def _attach(link: Link, ws_id: str, sock: socket.socket) -> _Channel:
    """A relay between ``sock`` and a channel still to open (its data waits)."""
    side = _Channel(link, ws_id)
    proto = _Socket(side)
    loop = asyncio.get_running_loop()
    try:
        await loop.create_unix_connection(lambda: proto, sock=sock)
    except BaseException:
        sock.close()
        raise
    side.sock = proto
    return side


async def relay_out(link: Link, ws_id: str, sock: socket.socket, open_channel: OpenChannel) -> None:
    """Relay a connection accepted inside the workspace to a new channel to the client."""
    side = await _attach(link, ws_id, sock)
    try:
        await open_channel(lambda: side)
    except (asyncssh.ChannelOpenError, asyncssh.Error, OSError) as exc:
        log.info("ssh: the client refused a forwarded channel: %s", exc)
        t = side._transport()
        if t is not None:
            t.close()


async def serve(
    listener: socket.socket, accepted: Callable[[socket.socket], None], name: str
) -> None:
    """Accept on ``listener`` until cancelled, handing each connection to ``accepted``."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, _ = await loop.sock_accept(listener)
        except OSError as exc:  # EMFILE and the like: do not spin
            log.warning("ssh: accept on %s failed: %s", name, exc)
            await asyncio.sleep(1)
            continue
        conn.setblocking(False)
        accepted(conn)


def _refused(exc: DenError) -> asyncssh.ChannelOpenError:
    return asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.message)


async def _account(link: Link, ws: Ready, login: str) -> Account:
    """The account the connection's sessions run as: sockets are made as it."""
    return await login_account(link.app, ws.spec, ROOT if as_root(login) else "")


async def open_direct(link: Link, login: str, path: str) -> _Channel:
    """``ssh -L LOCAL:PATH``: connect to ``path`` inside the link's workspace."""
    assert link.ref is not None
    try:
        ws = await ready(link.app, link.caller, link.ref)
        acct = await _account(link, ws, login)
        sock = await inside_socket(link.app, ws, acct.ids, "connect", path, cwd=acct.home)
    except DenError as exc:
        raise _refused(exc) from None
    link.session.opened("forward")
    return await _attach(link, ws.ws_id, sock)


class RemoteListener(asyncssh.SSHListener):
    """``ssh -R PATH:LOCAL``: a socket listening at ``path`` inside the workspace;
    each connection to it becomes a forwarded-streamlocal channel to the client.
    asyncssh closes it on cancel-streamlocal-forward and when the connection ends."""

    def __init__(self, link: Link, conn: asyncssh.SSHServerConnection, ws_id: str, path: str):
        super().__init__()
        self.link, self.conn, self.ws_id, self.path = link, conn, ws_id, path
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None

    def start(self, sock: socket.socket) -> None:
        self.sock = sock
        self.task = tasks.spawn(serve(sock, self._accepted, self.path), name="ssh-unix-listener")

    def _accepted(self, conn: socket.socket) -> None:
        if self.link.revoked:
            conn.close()
            return

        def open_channel(factory: Callable[[], asyncssh.SSHUNIXSession[bytes]]) -> Awaitable[Any]:
            return self.conn.create_unix_connection(factory, self.path)

        tasks.spawn(relay_out(self.link, self.ws_id, conn, open_channel), name="ssh-unix-in")

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def wait_closed(self) -> None:
        return None


async def listen_remote(
    link: Link, conn: asyncssh.SSHServerConnection, login: str, path: str
) -> RemoteListener | bool:
    """``streamlocal-forward``: listen at ``path`` inside the workspace, as the
    session's account (the stale-file rule is OpenSSH's default: none replaced)."""
    assert link.ref is not None
    try:
        ws = await ready(link.app, link.caller, link.ref)
        acct = await _account(link, ws, login)
        sock = await inside_socket(link.app, ws, acct.ids, "listen", path, cwd=acct.home)
    except DenError as exc:
        log.info("ssh -R %s refused: %s", path[:200], exc.message)
        return False
    link.session.opened("forward")
    listener = RemoteListener(link, conn, ws.ws_id, path)
    listener.start(sock)
    return listener
