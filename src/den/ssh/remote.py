"""``ssh -R PORT:HOST:PORT``: a TCP listener inside the caller's workspace whose
connections the client serves (``forwarded-tcpip`` channels).

The listening socket is made inside the workspace's network namespace (so the
workspace's own loopback, its firewall, and only its addresses), once, by the
one thread that switches namespaces; connections are then accepted on the
event loop like any other socket's. Ports below 1024 need root inside. The
listener ends when the client cancels it, when the connection ends, and when
the workspace stops (its init's pidfd says so).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import asyncssh

from den.errors import DenError
from den.services.account import ROOT, login_account
from den.ssh import bridge
from den.ssh.target import Ready, as_root, ready

if TYPE_CHECKING:
    from den.ssh.link import Link

log = logging.getLogger(__name__)
BACKLOG = 128
WORKSPACE_ONLY = "forward through a workspace login: ssh -R PORT:localhost:PORT WORKSPACE@host"


class Refused(Exception):
    """Why a remote forwarding is refused (logged; the client learns it with ssh -v)."""


async def root_inside(link: Link, login: str, ws: Ready) -> bool:
    """Whether the login's sessions run as root inside the workspace (which may bind
    ports below 1024 there, as root may on any host)."""
    acct = await login_account(link.app, ws.spec, ROOT if as_root(login) else "")
    return acct.uid == 0


def bind_addresses(host: str, ws: Ready) -> list[tuple[int, str]]:
    """(family, address) to listen on for the client's bind address ``host``.

    Never resolved on the host: only the workspace's own names and IP literals;
    a literal that is none of the workspace's addresses fails to bind there.
    """
    if host in ("", "*"):
        return [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    if host == "0.0.0.0":
        return [(socket.AF_INET, "0.0.0.0")]
    if host == "localhost":
        return [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
    if host == ws.spec.hostname.lower() and ws.address:
        return [(socket.AF_INET, ws.address)]
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise Refused(
            f"den listens only on the workspace's own addresses (localhost, {ws.spec.hostname}, "
            "an address of it, or * for all), not on {host!r}"
        ) from None
    return [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))]


class RemoteListener(bridge.Listener):
    """Listening sockets inside one workspace for one ``tcpip-forward`` request."""

    def __init__(
        self, link: Link, conn: asyncssh.SSHServerConnection, ws: Ready, host: str, port: int
    ) -> None:
        super().__init__(link, ws.ws_id, f"ssh -R {host or '*'}:{port} of {link.ref}")
        self.conn = conn
        self.listen_host = host
        self.port = port
        self.ws = ws
        self._unwatch: Callable[[], None] | None = None

    def get_port(self) -> int:
        return self.port

    def open_channel(self, conn: socket.socket) -> bridge.OpenChannel:
        try:
            peer = conn.getpeername()
        except OSError:  # already gone: the channel says so no worse
            peer = ("", 0)

        def opener(factory: Callable[[], bridge.Bridge]) -> Awaitable[Any]:
            return self.conn.create_connection(
                factory, self.listen_host, self.port, str(peer[0]), int(peer[1])
            )

        return opener

    def start(self, socks: list[socket.socket]) -> None:
        super().start(socks)
        self._watch_workspace()

    def _watch_workspace(self) -> None:
        """Close when the workspace's processes end (stop, delete)."""
        backend = self.link.app.backend_for(self.ws.spec)
        self._unwatch = backend.watch_stopped(self.ws.spec, self.ws.state, self._workspace_stopped)

    def _workspace_stopped(self) -> None:
        log.info("ssh -R listener closed: the workspace stopped", extra={"ctx": {"ws": self.ws_id}})
        self.close()

    def close(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        super().close()


async def listen(
    link: Link, conn: asyncssh.SSHServerConnection, login: str, host: str, port: int
) -> RemoteListener | bool:
    """The listener for ``ssh -R [HOST:]PORT:...``, or False (refused; logged why)."""
    try:
        assert link.ref is not None
        ws = await ready(link.app, link.caller, link.ref)
        addrs = bind_addresses(host, ws)
        if 0 < port < 1024 and not await root_inside(link, login, ws):
            raise Refused(f"port {port} is below 1024: only root inside may listen there")
        socks = await _bind(link, ws, addrs, port)
    except Refused as exc:
        _refuse(conn, port, str(exc))
        return False
    except DenError as exc:
        _refuse(conn, port, exc.message)
        return False
    except OSError as exc:
        _refuse(conn, port, f"cannot listen on {host or '*'}:{port} in the workspace: {exc}")
        return False
    listener = RemoteListener(link, conn, ws, host, int(socks[0].getsockname()[1]))
    try:
        listener.start(socks)
    except BaseException:
        listener.close()
        raise
    link.session.opened("forward")
    log.info(
        "ssh -R listening",
        extra={"ctx": {"ws": ws.ws_id, "host": host, "port": listener.port}},
    )
    return listener


async def _bind(
    link: Link, ws: Ready, addrs: list[tuple[int, str]], port: int
) -> list[socket.socket]:
    """Sockets listening on ``addrs`` (one port for all; the first picks it when 0).

    Past the first, an address that cannot be had (no IPv6 in the workspace, the
    port taken there) is skipped, as OpenSSH's sshd does.
    """
    backend = link.app.backend_for(ws.spec)
    socks: list[socket.socket] = []
    try:
        for family, addr in addrs:
            try:
                sock = await backend.listen_tcp(ws.spec, ws.state, family, addr, port, BACKLOG)
            except OSError:
                if socks or addr == "::":  # "::" falls back to 0.0.0.0 (no IPv6 there)
                    continue
                raise
            port = int(sock.getsockname()[1])
            socks.append(sock)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise OSError(errno.EADDRNOTAVAIL, "no address to listen on")
    return socks


def _refuse(conn: asyncssh.SSHServerConnection, port: int, why: str) -> None:
    log.info("ssh -R refused", extra={"ctx": {"port": port, "why": why}})
    # A global request's failure carries no text; ssh -v shows this debug message.
    with contextlib.suppress(Exception):
        conn.send_debug(f"den: remote forwarding of port {port} refused: {why}")


def refuse_outside(conn: asyncssh.SSHServerConnection, port: int, why: str) -> bool:
    """A refusal for a connection that is no workspace login."""
    _refuse(conn, port, why)
    return False
