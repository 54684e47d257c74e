"""Unix sockets inside a workspace, over SSH: ``ssh -L LOCAL:/path/in/ws.sock``
(direct-streamlocal), ``ssh -R /path/in/ws.sock:LOCAL`` (streamlocal-forward),
and the sockets the agent (:mod:`den.ssh.agent`) listens on.

Every socket at a workspace path is made inside the workspace by
:mod:`den.ssh.socket_worker` and its fd handed back: the host never resolves
a path the workspace controls. The daemon then only moves bytes between the
socket and an SSH channel (:mod:`den.ssh.bridge`); workers are bounded per den
user (WORKERS_PER_USER running, WORKERS_WAITING waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import asyncssh

from den.errors import DenError, InvalidParams, QuotaExceeded
from den.services.account import ROOT, login_account
from den.slots import UserSlots
from den.ssh import bridge, limits
from den.ssh.target import Ready, as_root, ready

if TYPE_CHECKING:
    from den.app import App
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
    backend = app.backend_for(ws.spec)
    return await backend.unix_socket(
        ws.spec,
        ws.state,
        "listen" if op == "listen" else "connect",
        path,
        ids=ids,
        cwd=cwd,
        owner=owner,
        replace=replace,
        make_parent=make_parent,
    )


def _refused(exc: DenError) -> asyncssh.ChannelOpenError:
    code = asyncssh.OPEN_CONNECT_FAILED
    if isinstance(exc, QuotaExceeded):
        code = asyncssh.OPEN_RESOURCE_SHORTAGE
    return asyncssh.ChannelOpenError(code, exc.message)


async def _inside(link: Link, login: str, op: str, path: str) -> tuple[Ready, socket.socket]:
    """A socket ``op`` ("connect" or "listen") at ``path`` inside the link's
    workspace, made as the account the connection's sessions run as."""
    assert link.ref is not None
    ws = await ready(link.app, link.caller, link.ref)
    acct = await login_account(link.app, ws.spec, ROOT if as_root(login) else "")
    sock = await inside_socket(link.app, ws, link.caller.name, acct.ids, op, path, cwd=acct.home)
    return ws, sock


async def open_direct(link: Link, login: str, path: str) -> bridge.Bridge:
    """``ssh -L LOCAL:PATH``: connect to ``path`` inside the link's workspace."""
    ticket = limits.admit(link)
    if ticket is None:
        raise limits.too_many(link)
    try:
        ws, sock = await _inside(link, login, "connect", path)
    except DenError as exc:
        ticket.release()
        raise _refused(exc) from None
    except BaseException:
        ticket.release()
        raise
    link.session.opened("forward")
    return await bridge.attach(link, ws.ws_id, sock, ticket)


class RemoteListener(bridge.Listener):
    """``ssh -R PATH:LOCAL``: a socket listening at ``path`` inside the workspace;
    each connection to it becomes a forwarded-streamlocal channel to the client.
    asyncssh closes it on cancel-streamlocal-forward and when the connection ends."""

    def __init__(self, link: Link, conn: asyncssh.SSHServerConnection, ws_id: str, path: str):
        super().__init__(link, ws_id, f"ssh -R {path[:200]}")
        self.conn = conn
        self.path = path

    def open_channel(self, conn: socket.socket) -> bridge.OpenChannel:
        return lambda factory: self.conn.create_unix_connection(factory, self.path)


async def listen_remote(
    link: Link, conn: asyncssh.SSHServerConnection, login: str, path: str
) -> RemoteListener | bool:
    """``streamlocal-forward``: listen at ``path`` inside the workspace, as the
    session's account (the stale-file rule is OpenSSH's default: none replaced)."""
    try:
        ws, sock = await _inside(link, login, "listen", path)
    except DenError as exc:
        log.info("ssh -R %s refused: %s", path[:200], exc.message)
        return False
    link.session.opened("forward")
    listener = RemoteListener(link, conn, ws.ws_id, path)
    listener.start([sock])
    return listener
