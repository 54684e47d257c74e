"""``ssh -L``: direct-tcpip channels to ports inside the caller's workspace.

The TCP socket is made inside the workspace's network namespace, so that
``localhost`` is the workspace's own loopback (servers bound to 127.0.0.1
there, as VS Code's is, are reachable) and the workspace's firewall applies.
Only the workspace itself is a destination: its loopback, its name and its
address.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh

from den.errors import DenError
from den.ssh import bridge, limits
from den.ssh.target import ready

if TYPE_CHECKING:
    from den.ssh.link import Link

log = logging.getLogger(__name__)
CLONE_NEWNET = 0x40000000
LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost", "0.0.0.0"}
_libc = ctypes.CDLL(None, use_errno=True)
# One thread switches namespaces, so that no other thread ever runs in the wrong one.
_netns_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="den-netns")


def socket_in(netns: Path, family: int) -> socket.socket:
    """A TCP socket created in the network namespace ``netns`` (this thread returns home)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the workspace's network failed")
        try:
            return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                log.critical("could not return to the host network namespace; exiting")
                os._exit(70)
    finally:
        os.close(home)
        os.close(target)


async def open_tunnel(link: Link, host: str, port: int) -> bridge.Bridge:
    """Connect to ``host:port`` of the link's workspace; a refusal becomes the client's error."""
    ticket = limits.admit(link)
    if ticket is None:
        raise limits.too_many(link)
    try:
        return await _open_tunnel(link, host, port, ticket)
    except BaseException:
        ticket.release()
        raise


async def _open_tunnel(link: Link, host: str, port: int, ticket: limits.Ticket) -> bridge.Bridge:
    try:
        assert link.ref is not None
        ws = await ready(link.app, link.caller, link.ref)
        if host in LOOPBACK:
            addr = "::1" if host == "::1" else "127.0.0.1"
        elif host in (ws.address, ws.spec.hostname):
            addr = ws.address
        else:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                f"den forwards only to the workspace itself (localhost or {ws.spec.hostname})",
            )
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        loop = asyncio.get_running_loop()
        netns = link.app.backend.network.netns_path(ws.ws_id)
        sock = await loop.run_in_executor(_netns_thread, socket_in, netns, family)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (addr, port)), 10)
        except BaseException:
            sock.close()
            raise
        link.session.opened("forward")
        return await bridge.attach(link, ws.ws_id, sock, ticket)
    except asyncssh.ChannelOpenError:
        raise
    except DenError as exc:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, exc.message) from None
    except (OSError, TimeoutError) as exc:
        raise asyncssh.ChannelOpenError(
            asyncssh.OPEN_CONNECT_FAILED, f"cannot connect to port {port} in the workspace: {exc}"
        ) from None
