"""``ssh -A``: the client's agent at one stable socket inside the workspace.

One socket per (workspace, den user), at ``/run/den-agent/USER.sock`` inside,
made there (:func:`den.ssh.streamlocal.inside_socket`, so no workspace path is
ever resolved on the host) when a session of a forwarding connection first
needs it, and kept while at least one connection of that user to that
workspace forwards its agent: IDEs open several connections, and a tmux
server started in one outlives it. Each connection to the socket becomes an
``auth-agent@openssh.com`` channel to the newest forwarding connection still
open. With none open it serves nothing (a connection to it is closed at
once); it goes LINGER seconds after the last of them closed, so that the
next ``ssh -A`` (a reconnecting IDE, one command after another) finds it
without starting a worker, which would double the time of a short command.
It goes at once with the container (its init exiting: a restarted workspace
is a new mount namespace; the next forwarding session makes the socket again,
at the same path).

The socket file (mode 600) belongs to the account of the session that made it.
A den user's plain sessions (the owner's account, uid 1000) and root+ sessions
(root) share the one path: root reaches a socket the account owns, but not the
other way round. So a socket made for a root+ session is made again, at the
same path, for the account when a plain session of that user first needs it,
and it keeps serving every forwarding connection the old one served, root+
ones included; a root+ session uses the account's socket as it is. Either way
every live forwarding connection of the user stays served, whichever comes or
goes.

Each connection to the socket costs the daemon a descriptor until it ends: at
most :data:`den.ssh.limits.AGENT_RELAYS` at once per socket (and the user's
:data:`den.ssh.limits.RELAYS_PER_USER`), more are closed at once.

Consent is per connection: only a connection whose client asked
(``auth-agent-req@openssh.com``, which ``ssh -A`` sends) is ever asked for
keys, and only its sessions get ``SSH_AUTH_SOCK``. asyncssh would answer that
request by making a listener of its own on the host (in /tmp); den answers it
itself (:func:`take_requests`) and owns the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from den import tasks
from den.errors import DenError
from den.ssh import bridge, limits, streamlocal

if TYPE_CHECKING:
    from asyncssh.packet import SSHPacket

    from den.app import App
    from den.ssh.inside import Account
    from den.ssh.link import Link
    from den.ssh.target import Ready

log = logging.getLogger(__name__)
AGENT_DIR = "/run/den-agent"
LINGER = 300.0  # seconds an agent socket nobody forwards to stays (serving nothing)
_serial = itertools.count()
Key = tuple[str, str]  # (workspace id, den user name)


def path_of(user: str) -> str:
    """Where ``user``'s forwarded agent is inside a workspace."""
    return f"{AGENT_DIR}/{user}.sock"


def take_requests(chan: asyncssh.SSHServerChannel[Any], wanted: Callable[[], bool]) -> None:
    """Answer the agent-forwarding requests of session ``chan`` with ``wanted()``
    instead of asyncssh's own listener on the host."""

    def handler(packet: SSHPacket) -> bool:
        packet.check_end()
        return wanted()

    # asyncssh looks a channel request's handler up by this name on the channel.
    setattr(chan, "_process_auth_agent_req_at_openssh_dot_com_request", handler)  # noqa: B010


class Forwarding:
    """One connection whose client lends its agent to the workspace."""

    def __init__(self, agents: Agents, conn: asyncssh.SSHServerConnection, link: Link) -> None:
        self.agents = agents
        self.conn = conn
        self.link = link
        self.serial = next(_serial)  # newer connections are asked first
        self.open = True
        self.keys: set[Key] = set()

    @property
    def live(self) -> bool:
        # A revoked key or user stops serving at once, before its connection is gone.
        return self.open and not self.link.revoked

    async def socket(self, ws: Ready, acct: Account) -> str | None:
        """The workspace's agent socket for a session of this connection (made if
        needed), or None when it cannot be had (the session runs without it)."""
        return await self.agents.attach(self, ws, acct)

    async def open_channel(self, factory: Callable[[], bridge.Bridge]) -> Any:
        chan = self.conn.create_agent_channel()
        return await chan.open(factory)

    def close(self) -> None:
        self.open = False
        self.agents.detach(self)


class _Socket:
    """A listening agent socket in one workspace for one den user."""

    def __init__(self, key: Key, path: str, owner: str, sock: socket.socket) -> None:
        self.key = key
        self.path = path
        self.owner = owner  # UID:GID inside the socket file belongs to
        self.sock = sock
        # Stops watching for the workspace's end (den.backends.base.Backend.watch_stopped).
        self.unwatch: Callable[[], None] | None = None
        self.users: list[Forwarding] = []
        self.task: asyncio.Task[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None  # set while nobody forwards
        self.gate = limits.Gate(limits.AGENT_RELAYS, f"the agent socket {path}")

    def newest(self) -> Forwarding | None:
        live = [f for f in self.users if f.live]
        return max(live, key=lambda f: f.serial) if live else None


class Agents:
    """The agent sockets of every workspace, by (workspace, den user)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.sockets: dict[Key, _Socket] = {}
        self._locks: dict[Key, asyncio.Lock] = {}

    def forwarding(self, conn: asyncssh.SSHServerConnection, link: Link) -> Forwarding:
        return Forwarding(self, conn, link)

    async def attach(self, fwd: Forwarding, ws: Ready, acct: Account) -> str | None:
        key = (ws.ws_id, fwd.link.caller.name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if not fwd.live:
                return None
            cur = self.sockets.get(key)
            if cur is None or (cur.owner != acct.ids and acct.uid != 0):
                try:
                    made = await self._make(key, ws, acct)
                except (DenError, OSError) as exc:  # the session runs without it
                    why = exc.message if isinstance(exc, DenError) else str(exc)
                    log.warning("ssh agent socket for %s not made: %s", key, why)
                    return None
                if cur is not None:
                    # It was root's (made for a root+ login) and the account needs
                    # it: the new one at the same path serves the same connections.
                    made.users = cur.users
                    cur.users = []
                    self._drop(cur)
                cur = made
            if not fwd.live:  # the connection ended while the socket was made
                self._idle(cur)
                return None
            if fwd not in cur.users:
                cur.users.append(fwd)
                fwd.keys.add(key)
            if cur.expiry is not None:
                cur.expiry.cancel()
                cur.expiry = None
            return cur.path

    async def _make(self, key: Key, ws: Ready, acct: Account) -> _Socket:
        backend = self.app.backend_for(ws.spec)
        path = path_of(key[1])
        sock = await streamlocal.inside_socket(
            self.app,
            ws,
            key[1],
            "0:0",  # /run is root's inside; the socket file is then the account's
            "listen",
            path,
            owner=acct.ids,
            replace=True,
            make_parent=True,
        )
        made = _Socket(key, path, acct.ids, sock)
        try:
            made.unwatch = backend.watch_stopped(ws.spec, ws.state, lambda: self._drop(made))
        except BaseException:
            sock.close()
            raise
        made.task = tasks.spawn(
            bridge.serve(sock, lambda conn: self._accepted(made, conn), path),
            name="ssh-agent-listener",
        )
        self.sockets[key] = made
        log.info("ssh agent socket made", extra={"ctx": {"workspace": key[0], "user": key[1]}})
        return made

    def _accepted(self, owner: _Socket, conn: socket.socket) -> None:
        fwd = owner.newest()
        ticket = None if fwd is None else limits.admit(fwd.link, owner.gate)
        if fwd is None or ticket is None:  # nobody lends an agent now, or past a limit
            conn.close()
            return
        tasks.spawn(
            bridge.relay_out(fwd.link, owner.key[0], conn, fwd.open_channel, ticket),
            name="ssh-agent-relay",
        )

    def detach(self, fwd: Forwarding) -> None:
        for key in fwd.keys:
            cur = self.sockets.get(key)
            if cur is None:
                continue
            with contextlib.suppress(ValueError):
                cur.users.remove(fwd)
            self._idle(cur)
        fwd.keys.clear()

    def _idle(self, cur: _Socket) -> None:
        """Nobody forwards to ``cur`` any more: it goes in LINGER seconds unless one does."""
        if not cur.users and cur.expiry is None:
            cur.expiry = asyncio.get_running_loop().call_later(LINGER, self._drop, cur)

    def _drop(self, cur: _Socket) -> None:
        """Stop listening (nobody forwarded for LINGER seconds, or the container is
        gone). The file stays inside, refusing connections, until the next
        socket replaces it."""
        if cur.expiry is not None:
            cur.expiry.cancel()
            cur.expiry = None
        if self.sockets.get(cur.key) is cur:
            del self.sockets[cur.key]
        if cur.unwatch is not None:
            cur.unwatch()
            cur.unwatch = None
        if cur.task is not None:
            cur.task.cancel()
            cur.task = None
        cur.sock.close()

    def close(self) -> None:
        for cur in list(self.sockets.values()):
            self._drop(cur)
