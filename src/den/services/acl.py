"""Groups and the node ACL: ``group.*`` and ``acl.*`` (the check is den.rpc.acl's).

Groups hold den users and other groups (nested; loops refused). ACL entries grant
read, write or admin on a node method pattern (``*``, ``net.*``, ``vol.mount``)
to a group, a user, or anonymous local/remote callers. What acl.toml declares
(source "file") is read-only here: edit the file and call acl.reload.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import select

from den.db.models import AclEntry, AclGroup, AclMember, User
from den.errors import Conflict, Forbidden, InvalidParams, NotFound
from den.rpc import acl
from den.rpc.registry import REGISTRY, Cli, CliArg, CliOpt, Context, NoParams, Params, Right, method
from den.services.common import NAME_RE, Line


def _check_group(value: str) -> str:
    if not re.fullmatch(acl.GROUP_RE, value):
        raise ValueError(
            "a group name is 1 to 32 characters: a lowercase letter, then lowercase "
            "letters, digits, '-' or '_'"
        )
    return value


def _check_pattern(value: str) -> str:
    if not re.fullmatch(acl.PATTERN_RE, value):
        raise ValueError(
            "a pattern is *, a node method name (vol.mount) or one followed by .* "
            "(net.*, net.bridge.*)"
        )
    return value


def _check_principal(value: str) -> str:
    kind, _, name = value.partition(":")
    ok = (
        value in acl.ANONYMOUS
        or (kind == "group" and re.fullmatch(acl.GROUP_RE, name) is not None)
        or (kind == "user" and NAME_RE.fullmatch(name) is not None)
    )
    if not ok:
        raise ValueError(f"a principal is {acl.PRINCIPAL_HELP}")
    return value


GroupName = Annotated[str, Field(max_length=32), AfterValidator(_check_group)]
Pattern = Annotated[str, Field(max_length=128), AfterValidator(_check_pattern)]
Principal = Annotated[str, Field(max_length=40), AfterValidator(_check_principal)]
UserRef = Annotated[str, Field(max_length=31), AfterValidator(lambda v: _user_name(v))]
RightName = Literal["read", "write", "admin"]


def _user_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError("a user name is [a-z][a-z0-9-]{0,30}")
    return value


# -- shapes ------------------------------------------------------------------------------


class GroupOut(BaseModel):
    name: str
    description: str
    source: str = Field(description="api (group.create) or file (acl_file: read-only here).")
    users: list[str] = Field(description="Users who are direct members.")
    groups: list[str] = Field(description="Member groups: their users are members too.")
    created_at: datetime


class GroupDetail(GroupOut):
    all_users: list[str] = Field(description="Every member, through member groups too.")
    member_of: list[str] = Field(description="Groups this group is a member of (directly).")
    grants: list[EntryOut] = Field(description="ACL entries naming this group.")


class EntryOut(BaseModel):
    id: int
    principal: str
    pattern: str
    right: str
    source: str
    created_by: str
    created_at: datetime


GroupDetail.model_rebuild()


class GroupRef(Params):
    name: Annotated[GroupName, CliArg()] = Field(description="Group name.")


class GroupCreate(Params):
    name: Annotated[GroupName, CliArg()] = Field(description="Group name: [a-z][a-z0-9_-]{0,31}.")
    description: Line = Field("", max_length=200, description="What the group is for.")


class MemberChange(Params):
    group: Annotated[GroupName, CliArg()] = Field(description="The group to change.")
    user: UserRef | None = Field(None, description="A den user to add or remove.")
    member_group: GroupName | None = Field(
        None, description="A group to add or remove as a member (its users become members)."
    )


class Grant(Params):
    principal: Annotated[Principal, CliArg()] = Field(description=acl.PRINCIPAL_HELP + ".")
    pattern: Annotated[Pattern, CliArg()] = Field(
        description="Node methods: *, net.*, vol.*, net.bridge.*, vol.mount..."
    )
    right: Annotated[RightName, CliArg()] = Field(description="read, write or admin.")


class Revoke(Params):
    principal: Annotated[Principal, CliArg()] = Field(description=acl.PRINCIPAL_HELP + ".")
    pattern: Annotated[Pattern, CliArg()] = Field(description="The entry's pattern.")


class CheckParams(Params):
    method: Annotated[str, CliArg(), Field(max_length=128)] = Field(
        description="A method name (net.bridge.add)."
    )
    user: UserRef | None = Field(None, description="Whom to check (default: you).")
    anonymous: Literal["local", "remote"] | None = Field(
        None, description="Check an anonymous caller instead: local (unix socket) or remote."
    )
    via: Annotated[Literal["local", "remote"], CliOpt(flags=("--via",))] = Field(
        "local", description="The user's transport: local (unix socket) or remote (TCP, ssh)."
    )


class CheckOut(BaseModel):
    method: str
    who: str
    allowed: bool
    required: str
    granted: str = Field(description="The most the matching entries give (none: no entry).")
    acl_applies: bool
    patterns: list[str] = Field(description="Patterns that match the method.")
    reasons: list[dict[str, Any]] = Field(description="Matching entries, strongest first.")
    explanation: str


class ReloadOut(BaseModel):
    file: str
    present: bool
    groups: int
    entries: int
    warnings: list[str]


# -- helpers -----------------------------------------------------------------------------


async def _group(ctx: Context, name: str) -> AclGroup:
    g = (await ctx.db.execute(select(AclGroup).where(AclGroup.name == name))).scalar_one_or_none()
    if g is None:
        raise NotFound(f"no group {name!r}; `den group ls` lists them")
    return g


async def _user(ctx: Context, name: str) -> User:
    u = (await ctx.db.execute(select(User).where(User.name == name))).scalar_one_or_none()
    if u is None:
        raise NotFound(f"no user {name!r}")
    return u


def _from_file(what: str, name: str) -> Forbidden:
    return Forbidden(
        f"{what} {name} comes from the ACL file (acl_file): edit the file and run `den acl reload`"
    )


async def _group_out(ctx: Context, g: AclGroup, detail: bool = False) -> GroupOut:
    snap = await acl.snapshot(ctx.app)
    q = select(AclMember.user_id, AclMember.member_group_id).where(AclMember.group_id == g.id)
    users: list[str] = []
    groups: list[str] = []
    names = dict((await ctx.db.execute(select(User.id, User.name))).tuples().all())
    for uid, mgid in (await ctx.db.execute(q)).all():
        if uid is not None:
            users.append(names.get(uid, "?"))
        elif mgid is not None:
            groups.append(snap.group_names.get(mgid, "?"))
    base = {
        "name": g.name,
        "description": g.description,
        "source": g.source,
        "users": sorted(users),
        "groups": sorted(groups),
        "created_at": g.created_at,
    }
    if not detail:
        return GroupOut(**base)
    everyone = sorted(names[u] for u in names if g.id in snap.groups_of(u))
    member_of = sorted(snap.group_names.get(p, "?") for p in snap.parents.get(g.id, ()))
    entries = (await ctx.db.execute(select(AclEntry).where(AclEntry.group_id == g.id))).scalars()
    grants = [_entry_out(e, f"group:{g.name}") for e in entries]
    return GroupDetail(**base, all_users=everyone, member_of=member_of, grants=grants)


def _entry_out(e: AclEntry, principal: str) -> EntryOut:
    return EntryOut(
        id=e.id,
        principal=principal,
        pattern=e.pattern,
        right=e.right,
        source=e.source,
        created_by=e.created_by,
        created_at=e.created_at,
    )


async def _principal_filter(ctx: Context, principal: str) -> dict[str, Any]:
    """The entry columns naming ``principal`` (it must exist)."""
    if principal in acl.ANONYMOUS:
        return {"anonymous": acl.ANONYMOUS[principal], "group_id": None, "user_id": None}
    kind, _, name = principal.partition(":")
    if kind == "group":
        return {"group_id": (await _group(ctx, name)).id, "user_id": None, "anonymous": None}
    return {"user_id": (await _user(ctx, name)).id, "group_id": None, "anonymous": None}


async def _my_groups(ctx: Context) -> set[int]:
    if ctx.caller.user_id is None:
        return set()
    return set((await acl.snapshot(ctx.app)).groups_of(ctx.caller.user_id))


def _changed(ctx: Context) -> None:
    acl.mark_changed(ctx.db)


# -- group.* -----------------------------------------------------------------------------


@method(
    "group.list",
    right=Right.read,
    cli=Cli("group ls", columns=("name", "source", "users", "groups", "description")),
)
async def group_list(ctx: Context, p: NoParams) -> list[GroupOut]:
    """List groups: every group for an admin, the groups you are in for a member."""
    rows = (await ctx.db.execute(select(AclGroup).order_by(AclGroup.name))).scalars().all()
    if not ctx.caller.is_admin:
        mine = await _my_groups(ctx)
        rows = [g for g in rows if g.id in mine]
    return [await _group_out(ctx, g) for g in rows]


@method("group.get", right=Right.read, cli=Cli("group show"))
async def group_get(ctx: Context, p: GroupRef) -> GroupDetail:
    """Show a group: members, every member through nested groups, and its grants."""
    g = await _group(ctx, p.name)
    if not ctx.caller.is_admin and g.id not in await _my_groups(ctx):
        raise NotFound(f"no group {p.name!r}; `den group ls` lists them")
    out = await _group_out(ctx, g, detail=True)
    assert isinstance(out, GroupDetail)
    return out


@method("group.create", right=Right.admin, cli=Cli("group add", columns=("name", "source")))
async def group_create(ctx: Context, p: GroupCreate) -> GroupOut:
    """Create a group of den users (and of other groups), to name in ACL entries."""
    ctx.target = f"group:{p.name}"
    exists = await ctx.db.execute(select(AclGroup.id).where(AclGroup.name == p.name))
    if exists.first() is not None:
        raise Conflict(f"a group named {p.name!r} exists already")
    g = AclGroup(name=p.name, description=p.description, source="api", created_by=ctx.caller.name)
    ctx.db.add(g)
    await ctx.db.flush()
    _changed(ctx)
    return await _group_out(ctx, g)


class GroupDeleted(BaseModel):
    deleted: str


@method("group.delete", right=Right.admin, cli=Cli("group rm", confirm="Delete group {name}?"))
async def group_delete(ctx: Context, p: GroupRef) -> GroupDeleted:
    """Delete a group, its memberships and the ACL entries that name it."""
    ctx.target = f"group:{p.name}"
    g = await _group(ctx, p.name)
    if g.source == "file":
        raise _from_file("the group", p.name)
    await ctx.db.delete(g)
    await ctx.db.flush()
    _changed(ctx)
    return GroupDeleted(deleted=p.name)


async def _member_target(ctx: Context, p: MemberChange) -> tuple[AclGroup, dict[str, Any]]:
    if (p.user is None) == (p.member_group is None):
        raise InvalidParams("give exactly one of user and member_group", field="user")
    ctx.target = f"group:{p.group}"
    g = await _group(ctx, p.group)
    if g.source == "file":
        raise _from_file("the group", p.group)
    if p.user is not None:
        return g, {"user_id": (await _user(ctx, p.user)).id, "member_group_id": None}
    assert p.member_group is not None
    return g, {"member_group_id": (await _group(ctx, p.member_group)).id, "user_id": None}


def _member_q(g: AclGroup, cols: dict[str, Any]) -> Any:
    q = select(AclMember).where(AclMember.group_id == g.id)
    for col, value in cols.items():
        c = getattr(AclMember, col)
        q = q.where(c.is_(None) if value is None else c == value)
    return q


@method("group.add_member", right=Right.admin, cli=Cli("group add-member"))
async def group_add_member(ctx: Context, p: MemberChange) -> GroupOut:
    """Add a user, or a group (all its members, nested), to a group."""
    g, cols = await _member_target(ctx, p)
    mgid = cols["member_group_id"]
    if mgid is not None and acl.would_cycle(await acl.containment(ctx.db), g.id, mgid):
        raise Conflict(
            f"adding {p.member_group} to {p.group} would make a loop: {p.group} is "
            f"{'that group' if mgid == g.id else 'already a member of it, directly or nested'}"
        )
    if (await ctx.db.execute(_member_q(g, cols))).first() is None:
        ctx.db.add(AclMember(group_id=g.id, source="api", **cols))
        await ctx.db.flush()
        _changed(ctx)
    return await _group_out(ctx, g)


@method("group.remove_member", right=Right.admin, cli=Cli("group rm-member"))
async def group_remove_member(ctx: Context, p: MemberChange) -> GroupOut:
    """Remove a user or a member group from a group; it takes effect on the next call."""
    g, cols = await _member_target(ctx, p)
    row = (await ctx.db.execute(_member_q(g, cols))).scalar_one_or_none()
    if row is None:
        who = p.user if p.user is not None else f"group {p.member_group}"
        raise NotFound(f"{who} is not a direct member of {p.group}")
    await ctx.db.delete(row)
    await ctx.db.flush()
    _changed(ctx)
    return await _group_out(ctx, g)


# -- acl.* -------------------------------------------------------------------------------


async def _entries(ctx: Context) -> list[EntryOut]:
    snap = await acl.snapshot(ctx.app)
    users = dict((await ctx.db.execute(select(User.id, User.name))).tuples().all())
    mine = await _my_groups(ctx)
    out = []
    for e in (await ctx.db.execute(select(AclEntry).order_by(AclEntry.id))).scalars():
        if e.group_id is not None:
            principal = f"group:{snap.group_names.get(e.group_id, '?')}"
            visible = e.group_id in mine
        elif e.user_id is not None:
            principal = f"user:{users.get(e.user_id, '?')}"
            visible = e.user_id == ctx.caller.user_id
        else:
            principal = f"anonymous-{e.anonymous}"
            visible = True
        if ctx.caller.is_admin or visible:
            out.append(_entry_out(e, principal))
    return out


@method(
    "acl.list",
    right=Right.read,
    cli=Cli("acl ls", columns=("id", "principal", "pattern", "right", "source")),
)
async def acl_list(ctx: Context, p: NoParams) -> list[EntryOut]:
    """List node ACL entries: all for an admin, those that apply to you for a member."""
    return await _entries(ctx)


@method(
    "acl.grant",
    right=Right.admin,
    cli=Cli("acl grant", columns=("id", "principal", "pattern", "right", "source")),
)
async def acl_grant(ctx: Context, p: Grant) -> EntryOut:
    """Grant a right on node methods matching a pattern to a group, user or anonymous callers.

    One entry per principal and pattern: granting again sets its right."""
    ctx.target = f"acl:{p.principal}:{p.pattern}"
    if not acl.known_pattern(p.pattern, REGISTRY.methods):
        raise InvalidParams(
            f"{p.pattern!r} matches no node method (rpc.discover lists them)", field="pattern"
        )
    cols = await _principal_filter(ctx, p.principal)
    q = select(AclEntry).where(AclEntry.pattern == p.pattern)
    for col, value in cols.items():
        c = getattr(AclEntry, col)
        q = q.where(c.is_(None) if value is None else c == value)
    rows = (await ctx.db.execute(q)).scalars().all()
    if any(r.source == "file" for r in rows):
        raise _from_file("the entry for", f"{p.principal} on {p.pattern}")
    if rows:
        entry = rows[0]
        entry.right = p.right
    else:
        entry = AclEntry(
            pattern=p.pattern, right=p.right, source="api", created_by=ctx.caller.name, **cols
        )
        ctx.db.add(entry)
    await ctx.db.flush()
    _changed(ctx)
    return _entry_out(entry, p.principal)


class Revoked(BaseModel):
    revoked: int = Field(description="How many entries were removed.")


@method("acl.revoke", right=Right.admin, cli=Cli("acl revoke"))
async def acl_revoke(ctx: Context, p: Revoke) -> Revoked:
    """Remove the entry of a principal on a pattern; open sessions lose it on their next call."""
    ctx.target = f"acl:{p.principal}:{p.pattern}"
    cols = await _principal_filter(ctx, p.principal)
    q = select(AclEntry).where(AclEntry.pattern == p.pattern)
    for col, value in cols.items():
        c = getattr(AclEntry, col)
        q = q.where(c.is_(None) if value is None else c == value)
    rows = (await ctx.db.execute(q)).scalars().all()
    if not rows:
        raise NotFound(f"no entry for {p.principal} on {p.pattern}; `den acl ls` lists them")
    if any(r.source == "file" for r in rows):
        raise _from_file("the entry for", f"{p.principal} on {p.pattern}")
    for r in rows:
        await ctx.db.delete(r)
    await ctx.db.flush()
    _changed(ctx)
    return Revoked(revoked=len(rows))


@method("acl.check", right=Right.read, cli=Cli("acl check"))
async def acl_check(ctx: Context, p: CheckParams) -> CheckOut:
    """Say whether a user (default: you) or an anonymous caller may call a method, and why."""
    m = REGISTRY.methods.get(p.method)
    if m is None:
        raise InvalidParams("no such method (rpc.discover lists them)", field="method")
    if p.user is not None and p.anonymous is not None:
        raise InvalidParams("give user or anonymous, not both", field="anonymous")
    user: User | None = None
    if p.anonymous is None:
        name = p.user or ctx.caller.name
        if not ctx.caller.is_admin and name != ctx.caller.name:
            raise Forbidden("a member may check only themselves")
        if ctx.caller.user_id is None and p.user is None:
            raise InvalidParams("you are not a den user: give user or anonymous", field="user")
        user = await _user(ctx, name)
    place = p.anonymous or p.via
    who = f"anonymous-{place}" if user is None else user.name
    pats = acl.patterns_for(m.name) if acl.governs(m.name) else []
    base = {"method": m.name, "who": who, "required": m.right.name, "patterns": pats}
    if not acl.governs(m.name):
        text = f"{m.name} is not a node method: the den role decides (needs '{m.right.name}')"
        return CheckOut(
            **base, allowed=True, granted="n/a", acl_applies=False, reasons=[], explanation=text
        )
    uid = user.id if user is not None else None
    d = acl.decide(await acl.snapshot(ctx.app), m.name, int(m.right), uid, place)
    if user is not None and user.role == "admin":
        text = f"{who} is a den admin: admins may call every node method"
        allowed = True
    elif d.allowed:
        best = d.reasons[0]
        through = " via " + " < ".join(best["through"]) if best["through"] else ""
        text = (
            f"{who} may call {m.name}: {best['principal']}{through} has '{best['right']}' on "
            f"{best['pattern']} (needs '{m.right.name}')"
        )
        allowed = True
    else:
        text = (
            f"{who} may not call {m.name}: it needs '{m.right.name}' on one of "
            f"{', '.join(pats)}, and the matching entries give '{acl.right_name(d.granted)}'"
        )
        allowed = False
    return CheckOut(
        **base,
        allowed=allowed,
        granted=acl.right_name(d.granted),
        acl_applies=True,
        reasons=d.reasons,
        explanation=text,
    )


@method("acl.reload", right=Right.admin, cli=Cli("acl reload"))
async def acl_reload(ctx: Context, p: NoParams) -> ReloadOut:
    """Read acl_file again: what it declares replaces what it declared before.

    A file that is not valid changes nothing; the error names its line and field."""
    path = ctx.app.settings.acl_file
    ctx.target = f"acl_file:{path}"
    try:
        parsed = acl.parse_file(path)
        warnings = await acl.apply_file(ctx.db, parsed, path)
    except acl.AclFileError as exc:
        raise acl.file_error(exc) from None
    groups = len(parsed.group) if parsed else 0
    q = select(AclEntry.id).where(AclEntry.source == "file")
    entries = len((await ctx.db.execute(q)).all())
    return ReloadOut(
        file=str(path),
        present=parsed is not None,
        groups=groups,
        entries=entries,
        warnings=warnings,
    )
