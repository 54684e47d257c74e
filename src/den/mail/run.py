"""Mail's place in the daemon: started when ``mail_domain`` is set, else nothing."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from den.mail import inbound, outbound
from den.mail.smtp import Connections
from den.meta.server import add_port

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
OUTBOUND_PORT = 25
PER_USER = 4  # outbound SMTP connections of one user's workspaces at once
PEER_SHARE = 8  # inbound: one outside host may hold 1/PEER_SHARE of mail_max_connections


async def start(app: App) -> asyncio.Server | None:
    """Inbound SMTP on the host and outbound SMTP in every workspace; the caller
    closes the server it gets (None: mail is off)."""
    s = app.settings
    if not s.mail_domain:
        return None
    try:
        # Per outside host a share of the cap: one cannot take every slot.
        per_peer = max(1, s.mail_max_connections // PEER_SHARE)
        server = await inbound.start(app, Connections(s.mail_max_connections, per_peer))
    except OSError as err:
        raise SystemExit(
            f"den: cannot listen for mail on {s.mail_host}:{s.mail_port}: {err}"
        ) from None
    # Their own cap: outside senders cannot hold the workspaces' mail up, nor
    # one user (however many workspaces they have) the others'.
    out = Connections(s.mail_max_connections, PER_USER)
    add_port(app, OUTBOUND_PORT, outbound.factory(app, out))
    port = server.sockets[0].getsockname()[1]
    log.info(
        "mail serving", extra={"ctx": {"domain": s.mail_domain, "smtp": f"{s.mail_host}:{port}"}}
    )
    return server
