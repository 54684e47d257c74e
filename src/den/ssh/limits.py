"""What a tenant's forwarded connections may cost the daemon.

Each forwarded connection (a relay: ``ssh -L`` channels, and connections made
inside to an ``ssh -R`` socket or port or to the agent socket) holds a file
descriptor in the daemon for as long as it lasts, and the tenant makes them at
will. The daemon's RLIMIT_NOFILE is shared by every tenant, the gateway's
listener and the RPC socket, so relays are counted, and one past a limit is
closed at once (a channel refused) while the others go on:

- :data:`RELAYS_PER_LISTENER` through one ``ssh -R`` socket or port,
- :data:`AGENT_RELAYS` through one agent socket,
- :data:`RELAYS_PER_USER` over all of a den user's connections together.

A relay keeps its place until both of its ends are gone: the socket, and the
channel (a client that never answers a channel open, or never acknowledges its
close, keeps what that channel holds in the daemon; the place bounds it).

Nothing is read from a relay's socket before its channel is open (:func:`hold`),
and a channel the client has not confirmed within ``ssh_forward_open_seconds``
closes the connection inside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import asyncssh

from den.slots import UserSlots

if TYPE_CHECKING:
    from den.ssh.link import Link

log = logging.getLogger(__name__)
# IDEs stay far below these: VS Code keeps a few dozen channels per connection
# (its server, each terminal, each connection a browser makes to a forwarded
# port, six at a time), and each ssh-add or git command running holds one agent
# connection (ansible's forks=50 holds fifty). 1024 per user is 5% of the
# daemon's 20000 descriptors.
RELAYS_PER_LISTENER = 256
AGENT_RELAYS = 128
RELAYS_PER_USER = 1024
QUIET_SECONDS = 60.0  # one log line per limit and burst of refusals, not one per connection

_users = UserSlots()  # relays each den user has open now
_by_conn: dict[str, set[Ticket]] = {}  # by SSH session id: ended with their connection
_quiet: dict[str, float] = {}  # when each limit last logged a refusal


def quietly(key: str, why: str) -> None:
    """Log ``why`` as a warning unless ``key`` logged within QUIET_SECONDS."""
    now = time.monotonic()
    if now - _quiet.get(key, -QUIET_SECONDS) >= QUIET_SECONDS:
        _quiet[key] = now
        log.warning("ssh: %s (logged once a minute)", why)
    if len(_quiet) > 4096:  # many users and listeners over a long uptime: forget the old
        for k, t in list(_quiet.items()):
            if now - t >= QUIET_SECONDS:
                del _quiet[k]


class Gate:
    """The relays in flight through one listener (a socket or port inside)."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.running = 0


class Ticket:
    """One relay's place under its limits."""

    def __init__(self, gate: Gate | None, user: str, conn_id: str) -> None:
        self.gate = gate
        self.user = user
        self.conn_id = conn_id
        self.ends = {"socket", "channel"}
        self.released = False
        self.close_socket: Callable[[], None] | None = None  # set once the socket has a transport

    def ended(self, end: str) -> None:
        """``end`` ("socket" or "channel") is gone; the place is freed with the last."""
        self.ends.discard(end)
        if not self.ends:
            self.release()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.gate is not None:
            self.gate.running -= 1
        _users.release(self.user)
        mine = _by_conn.get(self.conn_id)
        if mine is not None:
            mine.discard(self)
            if not mine:
                del _by_conn[self.conn_id]


def admit(link: Link, gate: Gate | None = None) -> Ticket | None:
    """A place for one more relay of ``link``'s user (through ``gate``), or None
    past a limit (logged at most once a minute per limit)."""
    user = link.caller.name
    if gate is not None and gate.running >= gate.limit:
        quietly(
            f"gate:{id(gate)}", f"{gate.what} has {gate.limit} connections open: new ones closed"
        )
        return None
    if not _users.take(user, RELAYS_PER_USER):
        quietly(
            f"user:{user}", f"{user} has {RELAYS_PER_USER} forwarded connections: new ones closed"
        )
        return None
    if gate is not None:
        gate.running += 1
    ticket = Ticket(gate, user, link.session.id)
    _by_conn.setdefault(link.session.id, set()).add(ticket)
    return ticket


def too_many(link: Link) -> asyncssh.ChannelOpenError:
    """The refusal of a channel past the user's limit."""
    return asyncssh.ChannelOpenError(
        asyncssh.OPEN_RESOURCE_SHORTAGE,
        f"busy: {link.caller.name} has {RELAYS_PER_USER} forwarded connections open "
        "(den's limit per user)",
    )


def connection_ended(conn_id: str) -> None:
    """The SSH connection ``conn_id`` is gone: so are its relays (their sockets
    closed), including one asyncssh dropped before its channel opened."""
    for ticket in list(_by_conn.pop(conn_id, ())):
        if ticket.close_socket is not None:
            ticket.close_socket()
        ticket.release()


def hold(transport: asyncio.Transport) -> None:
    """Read nothing more from ``transport`` until its resume_reading().

    Python 3.11's socket transport adds its reader after connection_made even
    when that paused it, and pause_reading() is then a no-op while reads go on:
    resuming first makes the pause take the reader off for real.
    """
    if transport.is_closing():
        return
    if not transport.is_reading():
        transport.resume_reading()
    transport.pause_reading()


def hold_until_open(transport: asyncio.Transport, waiting: Callable[[], bool]) -> None:
    """From connection_made: hold ``transport``, and again on the next turn of
    the loop (after asyncio added its reader) while ``waiting()``, so that
    nothing is read before the channel opens (a read that still comes is one,
    at most 256 KiB: the protocol keeps it and holds again)."""
    hold(transport)

    def again() -> None:
        if waiting():
            hold(transport)

    asyncio.get_running_loop().call_soon(again)
