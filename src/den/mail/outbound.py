"""Outbound SMTP: 169.254.169.254:25 inside every workspace, relayed with den's From.

The workspace is known by the listener that accepted the connection (den
opens one inside each workspace's network namespace), so nothing a workspace
sends can make its mail another's. The envelope sender and the ``From`` field
are its own address, NAME.OWNER@mail_domain: a ``From`` claiming anything else
is rewritten, not refused, because programs inside (cron, git send-email, a
bare sendmail) write whatever user@host they know and the result is the same:
nothing leaves under another address. ``Sender`` and ``Return-Path`` go too.

Each user's workspaces together send at most mail_per_hour messages (counted in
this process: a restart forgets them). Every message handed on is audited
(``mail.send``: the recipients' count and the size, never the addresses or
the body).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiosmtplib
from aiosmtpd.smtp import Envelope, Session

from den import mail, secretbox
from den.db.models import AuditEvent
from den.errors import DenError
from den.mail.smtp import (
    CappedSMTP,
    Connections,
    crlf,
    field_name,
    join,
    malformed,
    split_headers,
)

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)

RELAY_FILE = "mail-relay.json"  # in DATA_DIR: {"username": ..., "password": sealed}
RELAY_PURPOSE = "mail-relay"
RELAY_TIMEOUT = 60.0
WINDOW = 3600.0
_DROP = {b"from", b"sender", b"return-path"}


class Identity(Protocol):
    """The workspace a connection came from (den.meta's WsIdentity)."""

    @property
    def name(self) -> str: ...
    @property
    def owner(self) -> str: ...
    @property
    def ws_id(self) -> str: ...


class RateLimit:
    """Messages per user over the last hour (a sliding window)."""

    def __init__(self) -> None:
        self._sent: dict[str, collections.deque[float]] = {}

    def retry_after(self, user: str, limit: int) -> float:
        """Seconds until ``user`` may send one more; 0: now."""
        q = self._sent.get(user)
        now = time.monotonic()
        while q and q[0] <= now - WINDOW:
            q.popleft()
        if q is not None and not q:
            del self._sent[user]
        if limit <= 0:
            return WINDOW
        if q is None or len(q) < limit:
            return 0.0
        return q[-limit] + WINDOW - now

    def take(self, user: str) -> None:
        self._sent.setdefault(user, collections.deque()).append(time.monotonic())


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_options(mode: str, with_login: bool, host: str) -> dict[str, bool]:
    """aiosmtplib's TLS arguments for ``mail_relay_tls``.

    ``auto`` takes STARTTLS when the relay offers it; with a password to send to
    a relay that is not on this host it requires it: whoever sits between den
    and the relay could strip the offer and read the password.
    """
    if mode == "tls":
        return {"use_tls": True}
    if mode == "starttls" or (mode == "auto" and with_login and not _loopback(host)):
        return {"start_tls": True}
    if mode == "none":
        return {"start_tls": False}
    return {}


def relay_login(data_dir: Path) -> tuple[str, str] | None:
    """The relay's username and password (unsealed), if an admin stored them."""
    try:
        stored = json.loads((data_dir / RELAY_FILE).read_text())
    except FileNotFoundError:
        return None
    password = secretbox.unseal(data_dir, stored["password"], RELAY_PURPOSE).decode()
    return str(stored["username"]), password


def save_relay_login(data_dir: Path, username: str, password: str) -> None:
    """Store the relay's credentials, the password sealed; root-only file."""
    path = data_dir / RELAY_FILE
    sealed = secretbox.seal(data_dir, password.encode(), RELAY_PURPOSE)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    tmp.write_text(json.dumps({"username": username, "password": sealed}))
    tmp.replace(path)


class Outbound:
    """aiosmtpd's handler for one connection from one workspace."""

    def __init__(self, app: App, who: Identity, rate: RateLimit) -> None:
        self.app = app
        self.who = who
        self.rate = rate
        self.address = mail.address(who.name, who.owner, app.settings.mail_domain)

    def _rate_refusal(self) -> str | None:
        wait = self.rate.retry_after(self.who.owner, self.app.settings.mail_per_hour)
        if wait <= 0:
            return None
        return (
            f"450 4.7.1 rate limit of {self.app.settings.mail_per_hour} messages per hour "
            f"for {self.who.owner}; retry after {max(1, round(wait))} s"
        )

    async def handle_MAIL(
        self,
        server: CappedSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if not self.app.settings.mail_relay:
            return "550 5.7.1 den has no mail relay (the admin sets mail_relay)"
        refusal = self._rate_refusal()
        if refusal:
            return refusal
        # Whatever the client says: the mail is the workspace's.
        envelope.mail_from = self.address
        envelope.mail_options.extend(mail_options)
        return f"250 2.1.0 sender is {self.address}"

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
        if "@" not in address:
            return "501 5.1.3 a recipient is user@domain"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: CappedSMTP, session: Session, envelope: Envelope) -> str:
        content = crlf(envelope.original_content or b"")
        bad = malformed(content)
        if bad:
            return bad
        refusal = self._rate_refusal()
        if refusal:
            return refusal
        message = self.rewrite(content)
        self.rate.take(self.who.owner)
        start = time.perf_counter()
        reply, error = await self.relay(message, list(envelope.rcpt_tos))
        await self.audit(len(envelope.rcpt_tos), len(message), error, start)
        return reply

    def rewrite(self, content: bytes) -> bytes:
        fields, body = split_headers(content)
        fields = [f for f in fields if field_name(f) not in _DROP]
        names = {field_name(f) for f in fields}
        ours = [f"From: {self.address}".encode()]
        if b"date" not in names:
            ours.append(f"Date: {format_datetime(datetime.now(UTC))}".encode())
        if b"message-id" not in names:
            domain = self.app.settings.mail_domain
            ours.append(f"Message-ID: {make_msgid(domain=domain)}".encode())
        return join(ours + fields, body)

    async def relay(self, message: bytes, rcpts: list[str]) -> tuple[str, str]:
        """Hand ``message`` to the relay: (the SMTP reply for the workspace, the error or "")."""
        s = self.app.settings
        host, _, port = s.mail_relay.rpartition(":")
        kw: dict[str, Any] = {}
        try:
            login = await asyncio.to_thread(relay_login, s.data_dir)
        except (DenError, OSError, ValueError, KeyError) as err:
            log.error("mail relay credentials unreadable", extra={"ctx": {"error": str(err)}})
            return "451 4.3.5 den's relay credentials are unreadable; try later", "relay login"
        if login is not None:
            kw["username"], kw["password"] = login
        kw.update(tls_options(s.mail_relay_tls, login is not None, host.strip("[]")))
        try:
            await aiosmtplib.send(
                message,
                sender=self.address,
                recipients=rcpts,
                hostname=host.strip("[]"),
                port=int(port),
                timeout=RELAY_TIMEOUT,
                local_hostname=s.mail_domain,
                **kw,
            )
        except aiosmtplib.SMTPRecipientsRefused as err:
            first = err.recipients[0] if err.recipients else None
            code = first.code if first else 550
            text = first.message if first else "refused"
            return f"{code} the relay refused the recipients: {text[:200]}", f"relay {code}"
        except aiosmtplib.SMTPResponseException as err:
            code = err.code if 400 <= err.code < 600 else 451
            return f"{code} the relay said: {err.message[:200]}", f"relay {err.code}"
        except (aiosmtplib.SMTPException, OSError) as err:
            log.warning("mail relay unreachable", extra={"ctx": {"relay": s.mail_relay}})
            return (
                f"451 4.4.1 the relay {s.mail_relay} is unreachable; try later",
                f"relay down: {type(err).__name__}",
            )
        return "250 2.0.0 sent", ""

    async def audit(self, rcpts: int, size: int, error: str, start: float) -> None:
        async with self.app.sessions() as db:
            db.add(
                AuditEvent(
                    actor=self.who.owner,
                    via="mail",
                    method="mail.send",
                    target=f"workspace:{self.who.owner}/{self.who.name}",
                    params={"recipients": rcpts, "bytes": size},
                    outcome="error" if error else "ok",
                    error=error,
                    duration_ms=round((time.perf_counter() - start) * 1e3, 3),
                )
            )
            await db.commit()


def factory(app: App, conns: Connections) -> Callable[[Identity], asyncio.Protocol]:
    """For den.meta's add_port: a fresh SMTP session for a connection of ``who``."""
    rate = RateLimit()
    s = app.settings

    def make(who: Identity) -> asyncio.Protocol:
        return CappedSMTP(
            Outbound(app, who, rate),
            conns,
            who.owner,
            data_size_limit=s.mail_max_bytes,
            enable_SMTPUTF8=True,
            hostname=s.mail_domain,
            ident="den",
            timeout=60,
        )

    return make
