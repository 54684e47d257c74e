"""``ssh -L``: direct-tcpip channels to ports inside the caller's workspace.

The backend connects from inside the workspace (den.backends.base.Backend.connect),
so that ``localhost`` is the workspace's own loopback (servers bound to 127.0.0.1
there, as VS Code's is, are reachable) and the workspace's firewall applies.
Only the workspace itself is a destination: its loopback, its name and its
address.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import asyncssh

from den.errors import DenError
from den.ssh import bridge, limits
from den.ssh.target import ready

if TYPE_CHECKING:
    from den.ssh.link import Link

log = logging.getLogger(__name__)
LOOPBACK = {"localhost", "127.0.0.1", "::1", "ip6-localhost", "0.0.0.0"}


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
        backend = link.app.backend_for(ws.spec)
        sock = await backend.connect(ws.spec, ws.state, addr, port)
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
