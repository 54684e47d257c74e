"""Browser login: a one-time link made with an SSH identity becomes a browser session.

SSH keys (and what they vouch for: the den user's account, tokens) stay the only
identity: ``ssh host login`` or ``den login`` prints a short-lived link, and
opening it once signs the browser in as that user. The gate (den.web.gate)
calls :func:`consume_link` and :func:`session_user`; the registry methods list
and revoke sessions.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, cast

from pydantic import BaseModel, Field
from sqlalchemy import CursorResult, delete, func, or_, select, update
from sqlalchemy import event as sa_event

from den.db.models import AuditEvent, BrowserSession, LoginLink, User
from den.errors import Conflict, Forbidden, InvalidParams, NotFound, Unauthenticated
from den.rpc.registry import Cli, CliArg, Context, NoParams, Params, Right, method
from den.services.common import Name, user_or_self
from den.services.tokens import hash_secret
from den.web.allow import address
from den.web.urls import home_url

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)

COOKIE = "den_session"
LOGIN_PATH = "_den/login"
MAX_LIVE_LINKS = 20  # unused, unexpired links per user: a bound on rows, not a real limit
KEEP_ENDED = timedelta(days=7)  # ended sessions stay listed this long, then go
TOUCH_EVERY = 60.0  # seconds between writes of a session's last_seen_at
# "<id>_<secret>": hex ids, then token_urlsafe (which may itself contain "_").
_VALUE_RE = re.compile(r"([0-9a-f]{12,32})_([A-Za-z0-9_-]{32,64})")


@dataclass(frozen=True)
class SessionUser:
    """Who a browser session cookie stands for, as of now."""

    session_id: str
    user_id: int
    name: str
    role: str


class LinkOut(BaseModel):
    url: str = Field(description="Open it in a browser: it works once, until expires_at.")
    expires_at: datetime


class SessionOut(BaseModel):
    id: str
    user: str
    client: str
    agent: str
    created_at: datetime
    last_seen_at: datetime | None
    expires_at: datetime
    revoked_at: datetime | None
    state: str


class SessionList(Params):
    user: Name | None = Field(None, description="Whose sessions (admins: everyone's when omitted).")


class SessionRevoke(Params):
    id: Annotated[str | None, CliArg()] = Field(
        None, max_length=32, description="Browser session id (`den logins` lists them)."
    )
    all: bool = Field(False, description="Sign out every browser session of the user instead.")
    user: Name | None = Field(None, description="With --all: whose sessions (others: admins only).")


def _split(value: str) -> tuple[str, str] | None:
    m = _VALUE_RE.fullmatch(value) if len(value) <= 100 else None
    return (m.group(1), m.group(2)) if m else None


def _state(s: BrowserSession, now: datetime) -> str:
    if s.revoked_at is not None:
        return "revoked"
    if s.expires_at <= now:
        return "expired"
    return "active"


def _out(s: BrowserSession, user: str, now: datetime) -> SessionOut:
    return SessionOut(
        id=s.id,
        user=user,
        client=s.client,
        agent=s.agent,
        created_at=s.created_at,
        last_seen_at=s.last_seen_at,
        expires_at=s.expires_at,
        revoked_at=s.revoked_at,
        state=_state(s, now),
    )


def _printable(text: str, limit: int) -> str:
    # A User-Agent is the browser's to choose: no control characters reach a terminal.
    return "".join(c for c in text if c.isprintable())[:limit]


def _web_changed_after_commit(ctx: Context) -> None:
    """Tell the gate to forget its caches once the call's transaction commits."""
    app = ctx.app
    sa_event.listen(ctx.db.sync_session, "after_commit", lambda _s: app.web_changed(), once=True)


@method(
    "login.link",
    right=Right.write,
    cli=Cli("login", note="Open the URL in your browser: it works once, for a few minutes."),
)
async def login_link(ctx: Context, p: NoParams) -> LinkOut:
    """Make a one-time link that signs a browser in as you (short-lived, single use)."""
    if ctx.caller.user_id is None:
        # Only a den user's own credential makes a link: no one signs in as someone else.
        raise Forbidden(
            f"{ctx.caller.name} is not a den user: run `ssh HOST login` with your key, or "
            "`den login` as your own account"
        )
    now = datetime.now(UTC)
    db = ctx.db
    await db.execute(
        delete(LoginLink).where(or_(LoginLink.expires_at <= now, LoginLink.used_at.is_not(None)))
    )
    live = await db.scalar(
        select(func.count()).select_from(LoginLink).where(LoginLink.user_id == ctx.caller.user_id)
    )
    if (live or 0) >= MAX_LIVE_LINKS:
        raise Conflict(
            f"you have {MAX_LIVE_LINKS} unused login links; use one, or wait "
            f"{ctx.app.settings.login_link_seconds} s for them to expire"
        )
    lid = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    expires = now + timedelta(seconds=ctx.app.settings.login_link_seconds)
    db.add(
        LoginLink(
            id=lid,
            user_id=ctx.caller.user_id,
            secret_hash=hash_secret(secret),
            created_at=now,
            expires_at=expires,
        )
    )
    ctx.target = f"login:{lid}"
    url = f"{home_url(ctx.app.settings)}{LOGIN_PATH}?t={lid}_{secret}"
    return LinkOut(url=url, expires_at=expires)


@method(
    "login.list",
    right=Right.read,
    cli=Cli(
        "logins",
        columns=(
            "id",
            "user",
            "client",
            "agent",
            "created_at",
            "last_seen_at",
            "expires_at",
            "state",
        ),
    ),
)
async def login_list(ctx: Context, p: SessionList) -> list[SessionOut]:
    """List browser sessions (signed-in browsers): yours, or (admins) anyone's."""
    q = select(BrowserSession, User.name).join(User)
    if p.user is not None or not ctx.caller.is_admin:
        user = await user_or_self(ctx, p.user)
        q = q.where(BrowserSession.user_id == user.id)
    rows = (await ctx.db.execute(q.order_by(BrowserSession.created_at))).all()
    now = datetime.now(UTC)
    return [_out(s, name, now) for s, name in rows]


@method(
    "login.revoke",
    right=Right.write,
    cli=Cli("logout", columns=("id", "user", "client", "agent", "state")),
)
async def login_revoke(ctx: Context, p: SessionRevoke) -> list[SessionOut]:
    """Sign a browser out by session id, or all of a user's browsers (--all), at once."""
    if (p.id is None) == (not p.all):
        raise InvalidParams("give a browser session id or --all (one of them)", field="id")
    q = select(BrowserSession, User.name).join(User)
    if p.id is not None:
        if p.user is not None:
            raise InvalidParams("--user goes with --all only", field="user")
        ctx.target = f"login-session:{p.id}"
        q = q.where(BrowserSession.id == p.id)
        if not ctx.caller.is_admin:
            q = q.where(User.name == ctx.caller.name)
    else:
        user = await user_or_self(ctx, p.user)
        ctx.target = f"user:{user.name}"
        q = q.where(BrowserSession.user_id == user.id, BrowserSession.revoked_at.is_(None))
    rows = (await ctx.db.execute(q)).all()
    if p.id is not None and not rows:
        raise NotFound(f"no browser session {p.id!r}; `den logins` lists yours")
    now = datetime.now(UTC)
    for s, _name in rows:
        if s.revoked_at is None:
            s.revoked_at = now
    _web_changed_after_commit(ctx)
    return [_out(s, name, now) for s, name in rows]


async def link_user(app: App, value: str) -> str | None:
    """The user a login link would sign in as, if it is still good (nothing is used up):
    the page asks "sign in as NAME?", so nobody is signed in as someone else unawares."""
    parts = _split(value)
    if parts is None:
        return None
    lid, secret = parts
    async with app.sessions() as db:
        row = (
            await db.execute(select(LoginLink, User).join(User).where(LoginLink.id == lid))
        ).first()
    if row is None or not hmac.compare_digest(row[0].secret_hash, hash_secret(secret)):
        return None
    link, user = row
    if link.used_at is not None or link.expires_at <= datetime.now(UTC):
        return None
    return user.name


def _canonical(client: str) -> str:
    """A client address as sessions are bound to it ("" for none: matches nothing)."""
    ip = address(client)
    return "" if ip is None else str(ip)


def client_ok(bound: str | None, remote: str) -> bool:
    """Whether a request from ``remote`` may use a session bound to ``bound`` (None:
    an unbound session, good from anywhere)."""
    return bound is None or (bound != "" and _canonical(remote) == bound)


async def consume_link(
    app: App, value: str, client: str, agent: str, bind: bool = False
) -> tuple[str, datetime, str]:
    """Use a login link (``<id>_<secret>``) once: a new browser session.

    With ``bind`` the session is good only for requests from ``client`` (signed in
    on den's own TCP listener, whose host-only cookie every port of that host gets,
    a workspace's forwarded dev server too). Returns (cookie value, its expiry, user
    name); raises Unauthenticated when the link is unknown, used or expired.
    """
    parts = _split(value)
    if parts is None:
        raise Unauthenticated("this is not a den login link; run `ssh HOST login` for one")
    lid, secret = parts
    now = datetime.now(UTC)
    async with app.sessions() as db:
        row = (
            await db.execute(select(LoginLink, User).join(User).where(LoginLink.id == lid))
        ).first()
        if row is None or not hmac.compare_digest(row[0].secret_hash, hash_secret(secret)):
            raise Unauthenticated(
                "unknown login link (used links are forgotten); run `ssh HOST login` for a new one"
            )
        link, user = row
        if link.used_at is not None:
            raise Unauthenticated("this login link was used already; run `ssh HOST login` again")
        if link.expires_at <= now:
            raise Unauthenticated("this login link has expired; run `ssh HOST login` again")
        # Single use even when two browsers open it at once: only one update wins.
        won = cast(
            CursorResult[Any],
            await db.execute(
                update(LoginLink)
                .where(LoginLink.id == lid, LoginLink.used_at.is_(None))
                .values(used_at=now)
            ),
        )
        if won.rowcount != 1:
            raise Unauthenticated("this login link was used already; run `ssh HOST login` again")
        await db.execute(
            delete(BrowserSession).where(
                BrowserSession.user_id == user.id,
                or_(
                    BrowserSession.expires_at <= now - KEEP_ENDED,
                    BrowserSession.revoked_at <= now - KEEP_ENDED,
                ),
            )
        )
        sid = secrets.token_hex(8)
        session_secret = secrets.token_urlsafe(32)
        expires = now + timedelta(days=app.settings.web_session_days)
        db.add(
            BrowserSession(
                id=sid,
                user_id=user.id,
                secret_hash=hash_secret(session_secret),
                client=_printable(client, 64),
                agent=_printable(agent, 200),
                created_at=now,
                expires_at=expires,
                last_seen_at=now,
                bound_client=_canonical(client) if bind else None,
            )
        )
        db.add(
            AuditEvent(
                actor=user.name,
                via="web",
                method="login.consume",
                target=f"login-session:{sid}",
                params={"link": lid, "client": _printable(client, 64), "bound": bind},
                outcome="ok",
            )
        )
        name = user.name
        await db.commit()
    log.info("browser login", extra={"ctx": {"user": name, "session": sid, "client": client}})
    return f"{sid}_{session_secret}", expires, name


async def session_user(app: App, value: str, remote: str) -> SessionUser | None:
    """The user a session cookie stands for, sent by a client at ``remote``; None when
    unknown, revoked, expired, the user is gone, or the session is bound to another
    client address."""
    parts = _split(value)
    if parts is None:
        return None
    sid, secret = parts
    async with app.sessions() as db:
        row = (
            await db.execute(
                select(BrowserSession, User).join(User).where(BrowserSession.id == sid)
            )
        ).first()
        if row is None or not hmac.compare_digest(row[0].secret_hash, hash_secret(secret)):
            return None
        session, user = row
        now = datetime.now(UTC)
        if _state(session, now) != "active" or not client_ok(session.bound_client, remote):
            return None
        seen = session.last_seen_at
        if seen is None or (now - seen).total_seconds() > TOUCH_EVERY:
            session.last_seen_at = now
            await db.commit()
        return SessionUser(session.id, user.id, user.name, user.role)
