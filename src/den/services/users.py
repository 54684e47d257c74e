"""Users: a person or agent, with a role, quotas and a host Linux account."""

from __future__ import annotations

import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from den.db.models import SshKey, User, Workspace
from den.errors import Conflict, Forbidden, InvalidParams
from den.rpc.registry import Cli, CliArg, CliOpt, Context, NoParams, Params, Right, method
from den.services.common import Line, Name, UserName, find_user
from den.services.dotfiles import DotfilesUrl, shown
from den.services.keys import TAKEN, parse_public_key
from den.services.quotas import QUOTAS, defaulted, effective_quotas
from den.services.revocation import Revoked

if TYPE_CHECKING:
    from den.app import App

Role = Literal["admin", "member"]
Quota = Annotated[int | None, Field(ge=-1, le=1_000_000)]
# An address git can commit with: no spaces, quotes, angle brackets or control
# characters (they would break a commit's author line), one @, a dotted domain.
_EMAIL_RE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")


def _check_email(value: str) -> str:
    if value and not _EMAIL_RE.fullmatch(value):
        raise ValueError("an email is NAME@DOMAIN, e.g. ada@example.org (empty: none)")
    return value


Email = Annotated[str, Field(max_length=254), AfterValidator(_check_email)]


class UserOut(BaseModel):
    name: str
    role: str
    display_name: str
    email: str
    dotfiles_url: Annotated[str, AfterValidator(shown)] = Field(
        "", description="Dotfiles repository of new workspaces, credentials masked."
    )
    account: str
    uid: int | None
    subuid_start: int | None
    subuid_count: int | None
    max_workspaces: int | None
    max_cpu: int | None
    max_memory_mb: int | None
    max_disk_mb: int | None
    quota_defaults: list[str] = Field(
        default_factory=list, description="The max_* above that are the server's defaults."
    )
    keys: int
    created_at: datetime

    @classmethod
    def of(cls, u: User, keys: int, app: App) -> UserOut:
        return cls.of_row({c.name: getattr(u, c.name) for c in User.__table__.columns}, keys, app)

    @classmethod
    def of_row(cls, row: dict[str, Any], keys: int, app: App) -> UserOut:
        """The user as shown: each quota as it applies (None: no limit)."""
        own = {f: row[f] for f in QUOTAS}
        return cls.model_validate(
            {
                **row,
                **effective_quotas(app, row["role"], own),
                "quota_defaults": defaulted(row["role"], own),
                "keys": keys,
            }
        )


class _Named(Params):
    name: Annotated[UserName, CliArg()] = Field(description="User name: [a-z][a-z0-9-]{0,30}.")


class _Quotas(Params):
    # Unset: the server's default for members (settings default_max_*); -1: no limit.
    max_workspaces: Quota = Field(
        None, description="Most workspaces the user may own (-1: no limit; unset: default)."
    )
    max_cpu: Quota = Field(
        None, description="Most CPUs across the user's workspaces (-1: no limit; unset: default)."
    )
    max_memory_mb: Quota = Field(
        None, description="Most memory in MiB across workspaces (-1: no limit; unset: default)."
    )
    max_disk_mb: Quota = Field(
        None, description="Most disk in MiB across workspaces (-1: no limit; unset: default)."
    )


# Bases in this order put `name` first, for positional params.
class UserCreate(_Quotas, _Named):
    role: Annotated[Role, CliOpt(flags=("--admin",), flag_value="admin")] = Field(
        "member", description="admin or member."
    )
    display_name: Line = Field("", max_length=200, description="Full name shown in listings.")
    email: Email = Field("", description="Email address git commits with in the workspaces.")
    dotfiles: DotfilesUrl = Field("", description="Dotfiles repository of new workspaces.")
    keys: Annotated[list[str], CliOpt(flags=("--key",), read_file=True)] = Field(
        default_factory=list, max_length=100, description="OpenSSH public keys of the user."
    )


class UserRef(Params):
    name: Annotated[Name, CliArg()] = Field(description="User name.")


class UserUpdate(_Quotas, _Named):
    role: Role | None = Field(None, description="New role (admins only).")
    display_name: Line | None = Field(None, max_length=200, description="New display name.")
    email: Email | None = Field(None, description="New email address (empty: none).")
    dotfiles: DotfilesUrl | None = Field(
        None, description="Dotfiles repository of new workspaces (empty: none)."
    )


async def _key_count(ctx: Context, user_id: int) -> int:
    q = select(func.count()).select_from(SshKey).where(SshKey.user_id == user_id)
    return int((await ctx.db.execute(q)).scalar_one())


@method(
    "user.create",
    right=Right.admin,
    cli=Cli("user add", columns=("name", "role", "account", "uid", "subuid_start")),
)
async def user_create(ctx: Context, p: UserCreate) -> UserOut:
    """Create a user, their host Linux account den-NAME and its subordinate ids."""
    ctx.target = f"user:{p.name}"
    account_name = ctx.app.accounts.account_name(p.name)
    existing = await ctx.db.execute(select(User.id).where(User.name == p.name))
    if existing.first() is not None:
        raise Conflict(f"a user named {p.name!r} exists already")
    parsed = [parse_public_key(k) for k in p.keys]
    user = User(
        name=p.name,
        role=p.role,
        display_name=p.display_name,
        email=p.email,
        dotfiles_url=p.dotfiles,
        account=account_name,
        max_workspaces=p.max_workspaces,
        max_cpu=p.max_cpu,
        max_memory_mb=p.max_memory_mb,
        max_disk_mb=p.max_disk_mb,
    )
    ctx.db.add(user)
    try:
        await ctx.db.flush()
    except IntegrityError:
        # A concurrent create of the same name committed after our check above.
        raise Conflict(f"a user named {p.name!r} exists already") from None
    if len({k.fingerprint for k in parsed}) != len(parsed):
        raise InvalidParams("the same key is listed twice", field="keys")
    for key in parsed:
        same = select(SshKey.id).where(SshKey.fingerprint == key.fingerprint)
        try:
            dup = await ctx.db.execute(same)
        except IntegrityError:  # autoflush of the previous key, taken by a concurrent call
            raise Conflict(TAKEN) from None
        if dup.first() is not None:
            raise Conflict(TAKEN)
        ctx.db.add(SshKey(user_id=user.id, **key.columns()))
    account = await ctx.app.accounts.ensure(p.name)
    try:
        user.uid = account.uid
        user.subuid_start = account.subid_start
        user.subuid_count = account.subid_count
        await ctx.db.flush()
    except IntegrityError:
        await ctx.app.accounts.remove(p.name)
        raise Conflict(f"the user {p.name!r} or one of its keys exists already") from None
    except BaseException:
        await ctx.app.accounts.remove(p.name)
        raise
    return UserOut.of(user, len(parsed), ctx.app)


@method("user.get", right=Right.read, cli=Cli("user show"))
async def user_get(ctx: Context, p: UserRef) -> UserOut:
    """Show one user."""
    user = await find_user(ctx, p.name)
    return UserOut.of(user, await _key_count(ctx, user.id), ctx.app)


@method(
    "user.list",
    right=Right.read,
    cli=Cli("user ls", columns=("name", "role", "display_name", "account", "keys", "created_at")),
)
async def user_list(ctx: Context, p: NoParams) -> list[UserOut]:
    """List users: every user for an admin, only yourself for a member."""
    counts = select(SshKey.user_id, func.count().label("n")).group_by(SshKey.user_id).subquery()
    # Plain rows, not ORM objects: listing is the hot path of dashboards and scripts.
    q = select(*User.__table__.columns, func.coalesce(counts.c.n, 0).label("keys")).outerjoin(
        counts, counts.c.user_id == User.id
    )
    if not ctx.caller.is_admin:
        q = q.where(User.name == ctx.caller.name)
    rows = (await ctx.db.execute(q.order_by(User.name))).mappings().all()
    return [UserOut.of_row(dict(r), int(r["keys"]), ctx.app) for r in rows]


@method("user.update", right=Right.write, cli=Cli("user set"))
async def user_update(ctx: Context, p: UserUpdate) -> UserOut:
    """Change a user's display name and email (yourself), or role and quotas (admins)."""
    ctx.target = f"user:{p.name}"
    user = await find_user(ctx, p.name)
    admin_fields = {"role", *QUOTAS}
    changing = {f for f in p.model_fields_set if getattr(p, f) is not None} - {"name"}
    if changing & admin_fields and not ctx.caller.is_admin:
        raise Forbidden("only an admin may change a role or quotas")
    if p.role is not None and p.role != user.role:
        user.role = p.role
        ctx.app.revocations.after_commit(ctx, Revoked("role", user.id, user.name, role=p.role))
    if p.display_name is not None:
        user.display_name = p.display_name
    if p.email is not None:
        user.email = p.email
    if p.dotfiles is not None:
        user.dotfiles_url = p.dotfiles
    for f in QUOTAS:
        if f in changing:
            setattr(user, f, getattr(p, f))
    await ctx.db.flush()
    return UserOut.of(user, await _key_count(ctx, user.id), ctx.app)


class Deleted(BaseModel):
    deleted: str


@method("user.delete", right=Right.admin, cli=Cli("user rm", confirm="Delete user {name}?"))
async def user_delete(ctx: Context, p: UserRef) -> Deleted:
    """Delete a user with their keys, tokens and host Linux account."""
    ctx.target = f"user:{p.name}"
    user = await find_user(ctx, p.name)
    owned = (
        (await ctx.db.execute(select(Workspace.name).where(Workspace.user_id == user.id)))
        .scalars()
        .all()
    )
    if owned:
        raise Conflict(
            f"{p.name} still owns workspaces ({', '.join(sorted(owned))}); delete them first "
            f"(den rm {p.name}/NAME)"
        )
    await ctx.db.delete(user)
    await ctx.db.flush()
    ctx.app.revocations.after_commit(ctx, Revoked("user", user.id, user.name))
    await ctx.app.accounts.remove(p.name)
    return Deleted(deleted=p.name)
