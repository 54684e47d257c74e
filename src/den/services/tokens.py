"""API tokens: shown once, stored hashed, with a right and an optional expiry."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field
from sqlalchemy import event, select

from den.db.models import Token, User
from den.errors import Forbidden, InvalidParams, NotFound, Unauthenticated
from den.rpc.registry import Caller, Cli, CliArg, Context, Params, Right, method
from den.services.common import Line, Name, parse_when, user_or_self

if TYPE_CHECKING:
    from den.app import App

TOKEN_PREFIX = "den_"


def hash_secret(secret: str) -> str:
    # Secrets are 256 random bits: a plain SHA-256 is enough, no stretching needed.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """Return (id, full token string, hash of its secret)."""
    tid = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return tid, f"{TOKEN_PREFIX}{tid}_{secret}", hash_secret(secret)


class TokenOut(BaseModel):
    id: str
    user: str
    right: str
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    state: str


class TokenCreated(TokenOut):
    token: str = Field(description="The secret: shown this once, never again.")


class TokenCreate(Params):
    user: Name | None = Field(None, description="Owner (default: yourself; others: admins only).")
    right: Literal["read", "write", "admin"] = Field("write", description="read, write or admin.")
    expires: str | None = Field(
        None, max_length=64, description="Expiry: a duration (30d, 12h) or an ISO 8601 time."
    )
    description: Line = Field("", max_length=200, description="What the token is for.")


class TokenList(Params):
    user: Name | None = Field(None, description="Whose tokens (admins: everyone's when omitted).")


class TokenRef(Params):
    id: Annotated[str, CliArg()] = Field(max_length=32, description="Token id (not the secret).")


def _state(t: Token, now: datetime) -> str:
    if t.revoked_at is not None:
        return "revoked"
    if t.expires_at is not None and t.expires_at <= now:
        return "expired"
    return "active"


def _out(t: Token, user: str) -> TokenOut:
    return TokenOut(
        id=t.id,
        user=user,
        right=t.right,
        description=t.description,
        created_at=t.created_at,
        expires_at=t.expires_at,
        revoked_at=t.revoked_at,
        last_used_at=t.last_used_at,
        state=_state(t, datetime.now(UTC)),
    )


@method(
    "token.create",
    right=Right.write,
    cli=Cli(
        "token create",
        note="Store the token now: den keeps only its hash and cannot show it again.",
    ),
)
async def token_create(ctx: Context, p: TokenCreate) -> TokenCreated:
    """Create an API token; its secret is in the result once and stored only hashed."""
    user = await user_or_self(ctx, p.user)
    right = Right[p.right]
    if user.role != "admin" and right == Right.admin:
        raise Forbidden(f"{user.name} is a member: a member's token can have at most 'write'")
    if right > ctx.caller.right:
        raise Forbidden(
            f"you cannot create a token with more than your own '{ctx.caller.right.name}'"
        )
    expires = parse_when(p.expires, field="expires", future=True) if p.expires else None
    if expires is not None and expires <= datetime.now(UTC):
        raise InvalidParams("the expiry is in the past", field="expires")
    tid, token, digest = new_token()
    row = Token(
        id=tid,
        user_id=user.id,
        secret_hash=digest,
        right=p.right,
        description=p.description,
        expires_at=expires,
    )
    ctx.target = f"token:{tid}"
    ctx.db.add(row)
    await ctx.db.flush()
    return TokenCreated(**_out(row, user.name).model_dump(), token=token)


@method(
    "token.list",
    right=Right.read,
    cli=Cli("token ls", columns=("id", "user", "right", "state", "expires_at", "description")),
)
async def token_list(ctx: Context, p: TokenList) -> list[TokenOut]:
    """List tokens (never their secrets): yours, or (admins) anyone's."""
    q = select(Token, User.name).join(User)
    if p.user is not None or not ctx.caller.is_admin:
        user = await user_or_self(ctx, p.user)
        q = q.where(Token.user_id == user.id)
    rows = (await ctx.db.execute(q.order_by(Token.created_at))).all()
    return [_out(t, name) for t, name in rows]


@method("token.revoke", right=Right.write, cli=Cli("token revoke"))
async def token_revoke(ctx: Context, p: TokenRef) -> TokenOut:
    """Revoke a token at once; calls made with it fail from then on."""
    ctx.target = f"token:{p.id}"
    q = select(Token, User.name).join(User).where(Token.id == p.id)
    if not ctx.caller.is_admin:
        q = q.where(User.name == ctx.caller.name)
    row = (await ctx.db.execute(q)).first()
    if row is None:
        raise NotFound(f"no token {p.id!r}; `den token ls` lists yours")
    token, name = row
    if token.revoked_at is None:
        token.revoked_at = datetime.now(UTC)
        # The web gate keeps what a bearer token stood for: not past this commit.
        app = ctx.app
        event.listen(ctx.db.sync_session, "after_commit", lambda _s: app.web_changed(), once=True)
    return _out(token, name)


async def authenticate(app: App, header: str | None) -> Caller | None:
    """The caller a bearer token stands for; None when no token is sent."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
    value = value.strip()
    tid, _, secret = value.removeprefix(TOKEN_PREFIX).partition("_")
    if not value.startswith(TOKEN_PREFIX) or not tid or not secret:
        raise Unauthenticated("malformed token: den tokens look like den_<id>_<secret>")
    async with app.sessions() as db:
        row = (await db.execute(select(Token, User).join(User).where(Token.id == tid))).first()
        if row is None or not hmac.compare_digest(row[0].secret_hash, hash_secret(secret)):
            raise Unauthenticated("unknown token; create one with `den token create`")
        token, user = row
        now = datetime.now(UTC)
        state = _state(token, now)
        if state != "active":
            raise Unauthenticated(
                f"this token is {state}; create a new one with `den token create`"
            )
        if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
            token.last_used_at = now
            await db.commit()
        right = Right[token.right]
        if user.role != "admin":
            right = min(right, Right.write)
        return Caller(user.name, user.role, right, "tcp", user_id=user.id, token_id=token.id)
