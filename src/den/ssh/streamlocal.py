"""Unix sockets inside a workspace, over SSH: ``ssh -L LOCAL:/path/in/ws.sock``
(direct-streamlocal), ``ssh -R /path/in/ws.sock:LOCAL`` (streamlocal-forward),
and the relay the agent socket (:mod:`den.ssh.agent`) uses too.

Every socket at a workspace path is made inside the workspace by
:mod:`den.ssh.socket_worker` and its fd handed back: the host never resolves
a path the workspace controls. The daemon then only moves bytes between the
socket and an SSH channel, within :mod:`den.ssh.limits`; workers are bounded
per den user (WORKERS_PER_USER running, WORKERS_WAITING waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh.channel import SSHChannel

from den import tasks
from den.errors import BackendFailure, DenError, InvalidParams, QuotaExceeded
from den.services.account import ROOT, login_account
from den.slots import UserSlots
from den.ssh import join, limits
from den.ssh.session import SPAWN_ENV
from den.ssh.target import Ready, as_root, ready

if TYPE_CHECKING:
    from den.app import App
    from den.ssh.inside import Account
    from den.ssh.link import Link

log = logging.getLogger(__name__)
WORKER_SECONDS = 15.0
MAX_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
# A worker is a host Python process (some 10 MiB and 0.08 s of CPU, in the
# daemon's cgroup until it has joined the workspace), started per -L channel to
# a path, -R of a path and agent socket. Per den user at most WORKERS_PER_USER
# run at once and WORKERS_WAITING more wait their turn (an IDE opening a burst of
# socket channels is served in order); past that a request is refused at once.
WORKERS_PER_USER = 4
WORKERS_WAITING = 16

# Opens a channel to the client whose data goes to the session the factory makes.
OpenChannel = Callable[[Callable[[], asyncssh.SSHUNIXSession[bytes]]], Awaitable[Any]]


def check_path(path: str) -> None:
    """A path a Unix socket can have (raises InvalidParams naming the limit)."""
    if not path or "\0" in path:
        raise InvalidParams("the socket path must be non-empty, with no NUL byte")
    if len(path.encode()) > MAX_PATH:
        raise InvalidParams(f"the socket path is longer than {MAX_PATH} bytes")


class _Workers:
    """The socket workers each den user has running or waiting."""

    def __init__(self) -> None:
        self.admitted = UserSlots()  # running and waiting
        self.turns: dict[str, asyncio.Semaphore] = {}  # of users with any admitted

    @contextlib.asynccontextmanager
    async def slot(self, user: str) -> AsyncIterator[None]:
        if not self.admitted.take(user, WORKERS_PER_USER + WORKERS_WAITING):
            raise QuotaExceeded(
                f"busy: {WORKERS_PER_USER} socket workers are running for {user} and "
                f"{WORKERS_WAITING} more waiting (den's limit per user); try again"
            )
        turn = self.turns.setdefault(user, asyncio.Semaphore(WORKERS_PER_USER))
        try:
            try:
                await asyncio.wait_for(turn.acquire(), WORKER_SECONDS)
            except TimeoutError:
                raise QuotaExceeded(
                    f"busy: {user}'s socket workers did not free a turn in "
                    f"{WORKER_SECONDS:.0f}s (den runs {WORKERS_PER_USER} at once per user)"
                ) from None
            try:
                yield
            finally:
                turn.release()
        finally:
            self.admitted.release(user)
            if not self.admitted.count(user):
                self.turns.pop(user, None)


_workers: weakref.WeakKeyDictionary[App, _Workers] = weakref.WeakKeyDictionary()


async def inside_socket(
    app: App,
    ws: Ready,
    user: str,
    ids: str,
    op: str,
    path: str,
    cwd: str = "/",
    owner: str | None = None,
    replace: bool = False,
    make_parent: bool = False,
) -> socket.socket:
    """A socket bound and listening (``op`` "listen") or connected ("connect")
    at ``path`` inside ``ws``, made there as ``ids`` (UID:GID inside), by a
    worker counted as den user ``user``'s (QuotaExceeded past the limit)."""
    check_path(path)
    async with _workers.setdefault(app, _Workers()).slot(user):
        return await _run_worker(app, ws, ids, op, path, cwd, owner, replace, make_parent)


async def _run_worker(
    app: App,
    ws: Ready,
    ids: str,
    op: str,
    path: str,
    cwd: str,
    owner: str | None,
    replace: bool,
    make_parent: bool,
) -> socket.socket:
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
    # As --opt=value: a home inside starting with "-" is no option (argparse).
    opts = [f"--cwd={cwd}"]
    if owner:
        opts.append(f"--owner={owner}")
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
        # Read before the channel opened (one read at most: reading is held); None: EOF.
        self.early: list[bytes | None] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.side.ticket.close_socket = transport.abort
        if self.side.chan is None:
            limits.hold_until_open(transport, lambda: self.side.chan is None)

    def data_received(self, data: bytes) -> None:
        self.side.link.count_out(len(data))
        if self.side.chan is not None:
            self.side.chan.write(data)
        else:
            self.early.append(data)
            if self.transport is not None:
                limits.hold(self.transport)

    def eof_received(self) -> bool:
        if self.eof:  # again after a resume: told once
            return True
        self.eof = True
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
        self.side.ticket.ended("socket")


class _Channel(asyncssh.SSHUNIXSession[bytes]):
    """The client's side of a relay: one SSH channel."""

    def __init__(self, link: Link, ws_id: str, ticket: limits.Ticket) -> None:
        self.link = link
        self.ws_id = ws_id
        self.ticket = ticket
        self.chan: SSHChannel[bytes] | None = None
        self.sock: _Socket | None = None

    def connection_made(self, chan: asyncssh.SSHUNIXChannel[bytes]) -> None:
        self.chan = chan
        t = self._transport()
        if t is None or t.is_closing():  # given up inside before the client confirmed
            chan.close()
            return
        assert self.sock is not None
        for data in self.sock.early:
            if data is None:
                chan.write_eof()
            else:
                chan.write(data)
        self.sock.early.clear()
        t.resume_reading()

    def _transport(self) -> asyncio.Transport | None:
        return self.sock.transport if self.sock is not None else None

    def sock_abort(self) -> None:
        t = self._transport()
        if t is not None:
            t.abort()

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
        self.ticket.ended("channel")


async def _attach(link: Link, ws_id: str, sock: socket.socket, ticket: limits.Ticket) -> _Channel:
    """A relay between ``sock`` and a channel still to open (the socket is not
    read until it is)."""
    side = _Channel(link, ws_id, ticket)
    proto = side.sock = _Socket(side)
    loop = asyncio.get_running_loop()
    try:
        await loop.create_unix_connection(lambda: proto, sock=sock)
    except BaseException:
        sock.close()
        ticket.release()
        raise
    return side


async def relay_out(
    link: Link, ws_id: str, sock: socket.socket, open_channel: OpenChannel, ticket: limits.Ticket
) -> None:
    """Relay a connection accepted inside the workspace to a new channel to the client.

    The socket is closed if the client has not confirmed the channel within
    OPEN_SECONDS; the relay keeps its place until the client answers (a late
    channel is closed at once) or its connection ends.
    """
    side = await _attach(link, ws_id, sock, ticket)
    opening = asyncio.ensure_future(open_channel(lambda: side))
    try:
        done, _ = await asyncio.wait({opening}, timeout=limits.OPEN_SECONDS)
        if not done:
            log.info("ssh: a forwarded channel was not confirmed in time: closed inside")
            side.sock_abort()
        await opening
    except (asyncssh.ChannelOpenError, asyncssh.Error, OSError) as exc:
        log.info("ssh: the client refused a forwarded channel: %s", exc)
        side.sock_abort()
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


def _refused(exc: DenError) -> asyncssh.ChannelOpenError:
    code = asyncssh.OPEN_CONNECT_FAILED
    if isinstance(exc, QuotaExceeded):
        code = asyncssh.OPEN_RESOURCE_SHORTAGE
    return asyncssh.ChannelOpenError(code, exc.message)


async def _account(link: Link, ws: Ready, login: str) -> Account:
    """The account the connection's sessions run as: sockets are made as it."""
    return await login_account(link.app, ws.spec, ROOT if as_root(login) else "")


async def open_direct(link: Link, login: str, path: str) -> _Channel:
    """``ssh -L LOCAL:PATH``: connect to ``path`` inside the link's workspace."""
    assert link.ref is not None
    ticket = limits.admit(link)
    if ticket is None:
        raise limits.too_many(link)
    try:
        ws = await ready(link.app, link.caller, link.ref)
        acct = await _account(link, ws, login)
        sock = await inside_socket(
            link.app, ws, link.caller.name, acct.ids, "connect", path, cwd=acct.home
        )
    except DenError as exc:
        ticket.release()
        raise _refused(exc) from None
    except BaseException:
        ticket.release()
        raise
    link.session.opened("forward")
    return await _attach(link, ws.ws_id, sock, ticket)


class RemoteListener(asyncssh.SSHListener):
    """``ssh -R PATH:LOCAL``: a socket listening at ``path`` inside the workspace;
    each connection to it becomes a forwarded-streamlocal channel to the client.
    asyncssh closes it on cancel-streamlocal-forward and when the connection ends."""

    def __init__(self, link: Link, conn: asyncssh.SSHServerConnection, ws_id: str, path: str):
        super().__init__()
        self.link, self.conn, self.ws_id, self.path = link, conn, ws_id, path
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        self.gate = limits.Gate(limits.RELAYS_PER_LISTENER, f"ssh -R {path[:200]}")

    def start(self, sock: socket.socket) -> None:
        self.sock = sock
        self.task = tasks.spawn(serve(sock, self._accepted, self.path), name="ssh-unix-listener")

    def _accepted(self, conn: socket.socket) -> None:
        ticket = None if self.link.revoked else limits.admit(self.link, self.gate)
        if ticket is None:  # past a limit: closed at once, costing nothing
            conn.close()
            return

        def open_channel(factory: Callable[[], asyncssh.SSHUNIXSession[bytes]]) -> Awaitable[Any]:
            return self.conn.create_unix_connection(factory, self.path)

        tasks.spawn(
            relay_out(self.link, self.ws_id, conn, open_channel, ticket), name="ssh-unix-in"
        )

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
        sock = await inside_socket(
            link.app, ws, link.caller.name, acct.ids, "listen", path, cwd=acct.home
        )
    except DenError as exc:
        log.info("ssh -R %s refused: %s", path[:200], exc.message)
        return False
    link.session.opened("forward")
    listener = RemoteListener(link, conn, ws.ws_id, path)
    listener.start(sock)
    return listener
