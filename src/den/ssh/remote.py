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

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING

import asyncssh

from den import tasks
from den.errors import DenError
from den.services.account import ROOT, login_account
from den.ssh import limits
from den.ssh.forward import _netns_thread, socket_in
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


def _listen(sock: socket.socket, family: int, addr: str, port: int) -> int:
    """Bind and listen; return the port."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and addr == "::":
        # One socket for both families when the client asked for all addresses.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((addr, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return int(sock.getsockname()[1])


class _Tcp(asyncio.Protocol):
    """The workspace side of one forwarded connection."""

    def __init__(self, fwd: RemoteListener) -> None:
        self.fwd = fwd
        self.transport: asyncio.Transport | None = None
        self.ssh: _Ssh | None = None
        self.ticket: limits.Ticket | None = None
        # Read before the channel is open (one read at most: reading is held); None: EOF.
        self.early: list[bytes | None] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.ticket = limits.admit(self.fwd.link, self.fwd.gate)
        if self.ticket is None:  # past a limit: closed at once, costing nothing
            transport.abort()
            return
        self.ticket.close_socket = transport.abort
        # Nothing is read until the client has opened its channel.
        limits.hold_until_open(transport, lambda: self.ssh is None)
        peer = transport.get_extra_info("peername") or ("", 0)
        tasks.spawn(self._open(str(peer[0]), int(peer[1])), name="ssh-remote-forward")

    async def _open(self, orig_host: str, orig_port: int) -> None:
        fwd = self.fwd
        ssh = _Ssh(self, fwd)
        opening = asyncio.ensure_future(
            fwd.conn.create_connection(lambda: ssh, fwd.listen_host, fwd.port, orig_host, orig_port)
        )
        try:
            done, _ = await asyncio.wait({opening}, timeout=limits.OPEN_SECONDS)
            if not done:  # given up inside; the place is kept until the client answers
                log.info("ssh -R: a channel was not confirmed in time: closed inside")
                if self.transport is not None:
                    self.transport.abort()
            await opening
        except (asyncssh.Error, OSError) as exc:  # the client could not reach its side
            log.debug("ssh -R connection refused by the client: %s", exc)
            if self.transport is not None:
                self.transport.abort()
            if self.ticket is not None:
                self.ticket.ended("channel")
            return
        if self.transport is None or self.transport.is_closing():
            ssh.close()
            return
        self.ssh = ssh
        assert ssh.chan is not None
        for data in self.early:
            if data is None:
                ssh.chan.write_eof()
            else:
                ssh.chan.write(data)
        self.early.clear()
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.fwd.link.count_out(len(data))
        self.fwd.touch()
        if self.ssh is None or self.ssh.chan is None:
            self.early.append(data)
            if self.transport is not None:
                limits.hold(self.transport)
            return
        self.ssh.chan.write(data)

    def eof_received(self) -> bool:
        if self.eof:  # again after a resume: told once
            return True
        self.eof = True
        if self.ssh is not None and self.ssh.chan is not None:
            self.ssh.chan.write_eof()
        else:
            self.early.append(None)
        return True  # half-closed: the other direction may still flow

    def pause_writing(self) -> None:
        if self.ssh is not None and self.ssh.chan is not None:
            self.ssh.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.ssh is not None and self.ssh.chan is not None:
            self.ssh.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.ssh is not None:
            self.ssh.close()
        if self.ticket is not None:
            self.ticket.ended("socket")


class _Ssh(asyncssh.SSHTCPSession[bytes]):
    """The client side of one forwarded connection."""

    def __init__(self, tcp: _Tcp, fwd: RemoteListener) -> None:
        self.tcp = tcp
        self.fwd = fwd
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.fwd.link.count_in(len(data))
        self.fwd.touch()
        if self.tcp.transport is not None:
            self.tcp.transport.write(data)

    def eof_received(self) -> bool:
        t = self.tcp.transport
        if t is not None and t.can_write_eof():
            t.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.tcp.transport is not None:
            self.tcp.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.tcp.transport is not None:
            self.tcp.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tcp.transport is not None:
            self.tcp.transport.close()
        if self.tcp.ticket is not None:
            self.tcp.ticket.ended("channel")

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()


class RemoteListener(asyncssh.SSHListener):
    """Listening sockets inside one workspace for one ``tcpip-forward`` request."""

    def __init__(
        self, link: Link, conn: asyncssh.SSHServerConnection, ws: Ready, listen_host: str
    ) -> None:
        super().__init__()
        self.link = link
        self.conn = conn
        self.ws_id = ws.ws_id
        self.listen_host = listen_host
        self.port = 0
        self.servers: list[asyncio.Server] = []
        self._init_fd: int | None = None
        self._closed = asyncio.Event()
        self.gate = limits.Gate(limits.RELAYS_PER_LISTENER, "an ssh -R port")

    def get_port(self) -> int:
        return self.port

    def touch(self) -> None:
        self.link.app.activity.touch(self.ws_id, "forward")

    async def start(self, socks: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in socks:
            # asyncio's accept loop stops for a second on EMFILE and the like (no spin);
            # each connection it accepts is counted against self.gate in _Tcp.
            self.servers.append(await loop.create_server(lambda: _Tcp(self), sock=sock))
        self._watch_workspace()

    def _watch_workspace(self) -> None:
        """Close when the workspace's init ends (stop, delete): its pidfd turns readable."""
        backend = self.link.app.backend
        cid = backend.cid(self.ws_id)
        found = backend.crun.init_process(cid)
        if found is None:
            self.close()
            return
        try:
            fd = os.pidfd_open(found[0])
        except OSError:
            self.close()
            return
        if backend.crun.init_process(cid) != found:  # the pid was reused meanwhile
            os.close(fd)
            self.close()
            return
        self._init_fd = fd
        asyncio.get_running_loop().add_reader(fd, self._workspace_stopped)

    def _workspace_stopped(self) -> None:
        log.info("ssh -R listener closed: the workspace stopped", extra={"ctx": {"ws": self.ws_id}})
        self.close()

    def close(self) -> None:
        if self._init_fd is not None:
            asyncio.get_running_loop().remove_reader(self._init_fd)
            os.close(self._init_fd)
            self._init_fd = None
        for server in self.servers:
            server.close()
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()


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
    listener = RemoteListener(link, conn, ws, host)
    listener.port = int(socks[0].getsockname()[1])
    listener.gate.what = f"ssh -R {host or '*'}:{listener.port} of {link.ref}"
    try:
        await listener.start(socks)
    except BaseException:
        listener.close()
        for sock in socks:
            sock.close()
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
    loop = asyncio.get_running_loop()
    netns = link.app.backend.network.netns_path(ws.ws_id)
    socks: list[socket.socket] = []
    try:
        for family, addr in addrs:
            try:
                sock = await loop.run_in_executor(_netns_thread, socket_in, netns, family)
            except OSError:
                if socks or addr == "::":  # "::" falls back to 0.0.0.0 (no IPv6 there)
                    continue
                raise
            try:
                port = _listen(sock, family, addr, port)
            except OSError:
                sock.close()
                if socks or addr == "::":
                    continue
                raise
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
