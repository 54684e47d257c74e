"""Inbound SMTP: mail for NAME.OWNER@mail_domain into ~/Maildir inside the workspace.

The message is written by a process of the workspace's login user, started in
the workspace by an exec (a tiny sh writer, the message on its stdin): den
never writes into the snapshot from the host, where every byte and symlink is
the workspace's. The writer follows Maildir's rule (tmp/, then a rename into
new/) so that a mail reader never sees half a message.

A suspended workspace is resumed for delivery (as an ssh login or an exec
would). A stopped one gets 450 at RCPT: the sending server keeps the message
and retries for days, while starting a workspace its owner stopped would let
any outside sender undo that and spend the owner's resources.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import Envelope, Session
from sqlalchemy import select, update

from den import mail
from den.backends.base import ExecRequest
from den.db.models import User, Workspace
from den.errors import DenError
from den.mail.smtp import CappedSMTP, Connections, malformed, printable
from den.rpc.registry import REGISTRY, Caller, Context, Right
from den.services import account
from den.services.common import release_db
from den.services.power import ensure_running
from den.services.workspaces import find_workspace, spec_of
from den.slots import UserSlots

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)

# Delivery acts for den, not for a user: it may resume anyone's workspace.
MAIL = Caller("den-mail", "admin", Right.admin, "mail")

# $1: the file name. umask 077: a mailbox is its user's alone. `cat` writes
# tmp/ (same file system as new/), `mv` makes it appear whole.
WRITER = r"""set -eu
umask 077
m="$HOME/Maildir"
mkdir -p "$m/tmp" "$m/new" "$m/cur"
cat > "$m/tmp/$1"
mv "$m/tmp/$1" "$m/new/$1"
"""
DELIVERY_TIMEOUT = 120.0
# Deliveries at once: into one workspace, and over all of them (each is an exec,
# a few host processes). Past either the sender is told to come back (451).
PER_WORKSPACE = 2
TOTAL = 16


class Inbound:
    """aiosmtpd's handler: who may receive, and delivery."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.domain = app.settings.mail_domain
        self.running = UserSlots()  # per workspace
        self.total = 0

    async def _state(self, ws_name: str, owner: str) -> str | None:
        async with self.app.sessions() as db:
            q = (
                select(Workspace.state)
                .join(User, Workspace.user_id == User.id)
                .where(User.name == owner, Workspace.name == ws_name)
            )
            return (await db.execute(q)).scalar_one_or_none()

    async def handle_RCPT(
        self,
        server: CappedSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) >= self.app.settings.mail_max_recipients:
            return "452 4.5.3 too many recipients"
        parsed = mail.parse(address, self.domain)
        if parsed is None:
            if address.rpartition("@")[2].lower().rstrip(".") != self.domain:
                return "550 5.7.1 relaying denied: den takes mail for its workspaces only"
            return "550 5.1.1 no such mailbox"
        state = await self._state(*parsed)
        if state is None or state == "deleting":
            return "550 5.1.1 no such mailbox"
        if state not in ("running", "suspended"):
            return f"450 4.2.1 mailbox {mail.address(*parsed, self.domain)} is {state}; try later"
        envelope.rcpt_tos.append(mail.address(*parsed, self.domain))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: CappedSMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        bad = malformed(content)
        if bad:
            return bad
        received = (
            f"Return-Path: <{printable(envelope.mail_from or '')}>\r\n"
            f"Received: from {printable(session.host_name or '')} "
            f"({printable(str(session.peer[0]) if session.peer else '')})\r\n"
            f"\tby {self.domain} (den) with ESMTP; {format_datetime(datetime.now(UTC))}\r\n"
        ).encode()
        # Maildir files end lines with LF, as local mail readers expect.
        message = (received + content).replace(b"\r\n", b"\n")
        failed = []
        rcpts = list(dict.fromkeys(envelope.rcpt_tos))  # one named twice: delivered once
        for rcpt in rcpts:
            ws_name, owner = mail.parse(rcpt, self.domain) or ("", "")
            why = await self.deliver(ws_name, owner, message)
            if why:
                failed.append(f"{rcpt}: {why}")
        if failed and len(failed) == len(rcpts):
            return f"451 4.3.0 not delivered ({'; '.join(failed)[:300]}); try later"
        # Some delivered: a 4xx now would deliver those twice on the retry; the
        # others are in the log.
        for f in failed:
            log.warning("mail not delivered", extra={"ctx": {"rcpt": f}})
        return "250 2.0.0 delivered"

    async def deliver(self, ws_name: str, owner: str, message: bytes) -> str:
        """Write ``message`` into the workspace's Maildir; what went wrong, or ""."""
        key = f"{owner}/{ws_name}"
        if self.total >= TOTAL or not self.running.take(key, PER_WORKSPACE):
            return "too many deliveries under way"
        self.total += 1
        ctx = Context(self.app, MAIL, REGISTRY.get("workspace.resume"))
        try:
            ws, user = await find_workspace(ctx, key)
            await ensure_running(ctx, ws, user, "mail")
            spec = spec_of(self.app, ws, user)
            login = (await account.login_account(self.app, spec)).name
            name = f"{int(time.time())}.R{secrets.token_hex(8)}.den"
            req = ExecRequest(
                argv=["/bin/sh", "-c", WRITER, "den-mail", name],
                cwd="/",
                stdin=message,
                timeout=DELIVERY_TIMEOUT,
                user=login,
                max_output=4096,
            )
            await release_db(ctx)
            with self.app.activity.busy(ws.id, "mail"):
                res = await self.app.backend_for(spec).exec(spec, dict(ws.backend_state or {}), req)
            if res.exit_code != 0 or res.timed_out:
                err = res.stderr.decode(errors="replace").strip()[-200:]
                return f"the Maildir writer failed ({res.exit_code}): {err}"
            await ctx.db.execute(
                update(Workspace)
                .where(Workspace.id == ws.id)
                .values(last_activity_at=datetime.now(UTC), last_activity_kind="mail")
            )
            await ctx.db.commit()
            log.info("mail delivered", extra={"ctx": {"ws": key, "bytes": len(message)}})
            return ""
        except DenError as err:
            return err.message
        finally:
            await ctx.db.close()
            self.running.release(key)
            self.total -= 1


async def start(app: App, conns: Connections) -> asyncio.Server:
    """Listen on mail_host:mail_port; the caller closes the server it gets."""
    s = app.settings
    handler = Inbound(app)

    def session() -> Any:
        return CappedSMTP(
            handler,
            conns,
            data_size_limit=s.mail_max_bytes,
            enable_SMTPUTF8=True,
            hostname=s.mail_domain,
            ident="den",
            timeout=60,
        )

    server = await asyncio.get_running_loop().create_server(
        session, s.mail_host, s.mail_port, reuse_address=True
    )
    return server
