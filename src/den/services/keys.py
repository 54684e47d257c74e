"""SSH public keys of users: validated, fingerprinted, unique across users."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from den.db.models import SshKey, User
from den.errors import Conflict, InvalidParams, NotFound
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services.common import Name, find_user, is_line, user_or_self
from den.services.revocation import Revoked

MAX_KEY_TEXT = 16384
# Whose key it is stays unsaid: a public key is no proof of anything.
TAKEN = "this key is already registered; use another key"


@dataclass(frozen=True)
class ParsedKey:
    algorithm: str
    fingerprint: str
    public_key: str
    comment: str

    def columns(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "fingerprint": self.fingerprint,
            "public_key": self.public_key,
            "comment": self.comment,
        }


def parse_public_key(text: str) -> ParsedKey:
    """Validate one OpenSSH public key line; refuse private keys and options."""
    text = text.strip()
    if not text:
        raise InvalidParams("the key is empty", field="key")
    if len(text) > MAX_KEY_TEXT:
        raise InvalidParams(f"the key is longer than {MAX_KEY_TEXT} characters", field="key")
    if "PRIVATE KEY" in text:
        raise InvalidParams(
            "this is a private key: never send it; send the .pub file instead", field="key"
        )
    import asyncssh  # heavy: only when a key is parsed, not at CLI start

    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1:
        raise InvalidParams("send exactly one public key per call", field="key")
    try:
        key = asyncssh.import_public_key(lines[0])
    except (asyncssh.KeyImportError, ValueError, TypeError):
        raise InvalidParams(
            "not an OpenSSH public key (expected a line like 'ssh-ed25519 AAAA... comment')",
            field="key",
        ) from None
    if key.get_algorithm() == "ssh-dss":
        raise InvalidParams(
            "DSA keys are not accepted (obsolete); use an ed25519 key (ssh-keygen -t ed25519)",
            field="key",
        )
    comment = key.get_comment() or ""
    if not is_line(comment):  # shown in key listings: an escape sequence there is an attack
        raise InvalidParams(
            "the key's comment must be one line of printable text (no control characters)",
            field="key",
        )
    return ParsedKey(
        algorithm=key.get_algorithm(),
        fingerprint=key.get_fingerprint("sha256"),
        public_key=" ".join(key.export_public_key("openssh").decode().split()[:2]),
        comment=comment[:200],
    )


class KeyOut(BaseModel):
    user: str
    fingerprint: str
    algorithm: str
    comment: str
    created_at: datetime


class KeyAdd(Params):
    user: Annotated[Name, CliArg()] = Field(description="Owner of the key.")
    key: Annotated[str, CliArg(read_file=True)] = Field(
        max_length=MAX_KEY_TEXT, description="One OpenSSH public key line."
    )


class KeyList(Params):
    user: Annotated[Name | None, CliArg()] = Field(
        None, description="Whose keys (default: yours; admins: everyone's when omitted)."
    )


class KeyRemove(Params):
    user: Annotated[Name, CliArg()] = Field(description="Owner of the key.")
    fingerprint: Annotated[str, CliArg()] = Field(
        max_length=100, description="SHA256:... fingerprint."
    )


def _out(k: SshKey, user: str) -> KeyOut:
    return KeyOut(
        user=user,
        fingerprint=k.fingerprint,
        algorithm=k.algorithm,
        comment=k.comment,
        created_at=k.created_at,
    )


@method("key.add", right=Right.write, cli=Cli("key add"))
async def key_add(ctx: Context, p: KeyAdd) -> KeyOut:
    """Add an OpenSSH public key to a user; a key belongs to one user only."""
    user = await find_user(ctx, p.user)
    parsed = parse_public_key(p.key)
    ctx.target = f"key:{parsed.fingerprint}"
    q = select(SshKey.user_id).where(SshKey.fingerprint == parsed.fingerprint)
    owner = (await ctx.db.execute(q)).scalar_one_or_none()
    if owner == user.id:
        raise Conflict(f"{p.user} has the key {parsed.fingerprint} already")
    if owner is not None:
        raise Conflict(TAKEN)
    key = SshKey(user_id=user.id, **parsed.columns())
    ctx.db.add(key)
    try:
        await ctx.db.flush()
    except IntegrityError:
        # A concurrent key.add of the same key committed after our check above.
        raise Conflict(TAKEN) from None
    return _out(key, user.name)


@method(
    "key.list",
    right=Right.read,
    cli=Cli("key ls", columns=("user", "fingerprint", "algorithm", "comment", "created_at")),
)
async def key_list(ctx: Context, p: KeyList) -> list[KeyOut]:
    """List SSH keys: a user's, or (admins, no user named) every user's."""
    q = select(SshKey, User.name).join(User)
    if p.user is not None or not ctx.caller.is_admin:
        user = await user_or_self(ctx, p.user)
        q = q.where(SshKey.user_id == user.id)
    rows = (await ctx.db.execute(q.order_by(User.name, SshKey.id))).all()
    return [_out(k, name) for k, name in rows]


@method("key.remove", right=Right.write, cli=Cli("key rm"))
async def key_remove(ctx: Context, p: KeyRemove) -> KeyOut:
    """Remove a key from a user by its SHA256 fingerprint."""
    ctx.target = f"key:{p.fingerprint}"
    user = await find_user(ctx, p.user)
    q = select(SshKey).where(SshKey.user_id == user.id, SshKey.fingerprint == p.fingerprint)
    key = (await ctx.db.execute(q)).scalar_one_or_none()
    if key is None:
        raise NotFound(f"{p.user} has no key {p.fingerprint}; `den key ls {p.user}` lists them")
    out = _out(key, user.name)
    await ctx.db.delete(key)
    ctx.app.revocations.after_commit(ctx, Revoked("key", user.id, user.name, key.fingerprint))
    return out
