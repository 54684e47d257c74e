"""The node ACL: who may call the node's own methods (``net.*``, ``vol.*``).

A den role alone does not open the node API: a member's call of a node method
also needs an ACL entry granting at least the method's right (read < write <
admin) on a pattern matching its name (``*``, ``net.*``, ``net.bridge.*``,
``net.bridge.add``), to the member, to a group they belong to (directly or
through nested member groups) or to the anonymous callers of their transport
(being known never gives less than being anonymous). Admins keep everything.
Anonymous callers get what the entries for ``anonymous-local`` (the unix
socket) or ``anonymous-remote`` (TCP) grant.

Entries and groups live in the database (den.services.acl edits them) and come
from ``acl_file`` too (:func:`load_file`). The check reads an in-memory
snapshot rebuilt after any commit that touched a group, a membership, an entry
or a user: a revoked grant applies to the very next call, on any connection.
"""

from __future__ import annotations

import re
import tomllib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import delete, event, select
from sqlalchemy.orm import Session

from den.db.models import AclEntry, AclGroup, AclMember, User
from den.errors import Forbidden, InvalidParams, Unauthenticated
from den.rpc.registry import Right

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App
    from den.rpc.registry import Caller, Method

NODE_PREFIXES = ("net.", "vol.")
RIGHTS = ("read", "write", "admin")  # their values in den.rpc.registry.Right: 1, 2, 3
GROUP_RE = r"[a-z][a-z0-9_-]{0,31}"
# "*", or a node method name, or one followed by ".*" (every method under it).
PATTERN_RE = r"\*|(net|vol)((\.[a-z0-9_]{1,40}){1,4}(\.\*)?|\.\*)"
ANONYMOUS = {"anonymous-local": "local", "anonymous-remote": "remote"}
PRINCIPAL_HELP = "group:NAME, user:NAME, anonymous-local or anonymous-remote"


def governs(name: str) -> bool:
    """Whether the node ACL applies to the method ``name``."""
    return name.startswith(NODE_PREFIXES)


def matches(pattern: str, name: str) -> bool:
    if pattern == "*":
        return governs(name)
    if pattern.endswith(".*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def patterns_for(name: str) -> list[str]:
    """Every pattern that matches ``name``, the widest first."""
    parts = name.split(".")
    return ["*", *(".".join(parts[:i]) + ".*" for i in range(1, len(parts))), name]


def right_name(value: int) -> str:
    return RIGHTS[value - 1] if value else "none"


def where(caller: Caller) -> str:
    """``local`` for the unix socket, ``remote`` for everything reached over a network."""
    return "local" if caller.via in ("unix", "local") else "remote"


# -- what rpc.discover says ---------------------------------------------------------


def discover_note(m: Method) -> str:
    if not governs(m.name):
        return ""
    pats = patterns_for(m.name)
    return (
        f" Node ACL applies: admins, or a grant of '{m.right.name}' or more on "
        + ", ".join(pats[:-1])
        + f" or {pats[-1]} (den acl grant)."
    )


def discover_entry(m: Method) -> dict[str, Any]:
    if not governs(m.name):
        return {"applies": False}
    return {"applies": True, "right": m.right.name, "patterns": patterns_for(m.name)}


# -- the snapshot and its invalidation ------------------------------------------------


@dataclass(frozen=True)
class Grant:
    entry_id: int
    principal: str  # "group:ops", "user:ada", "anonymous-local", "anonymous-remote"
    pattern: str
    right: int
    source: str


@dataclass
class Snapshot:
    generation: int
    group_names: dict[int, str] = field(default_factory=dict)
    parents: dict[int, set[int]] = field(default_factory=dict)  # group -> groups holding it
    user_groups: dict[int, set[int]] = field(default_factory=dict)  # user -> direct groups
    by_group: dict[int, list[Grant]] = field(default_factory=dict)
    by_user: dict[int, list[Grant]] = field(default_factory=dict)
    anonymous: dict[str, list[Grant]] = field(default_factory=dict)

    def groups_of(self, user_id: int) -> dict[int, list[str]]:
        """Every group the user is in, with the chain of groups that puts them there."""
        out: dict[int, list[str]] = {}
        name = self.group_names.get
        todo = [(g, [name(g, "?")]) for g in sorted(self.user_groups.get(user_id, ()))]
        while todo:
            g, chain = todo.pop()
            if g in out:
                continue
            out[g] = chain
            todo.extend((p, [*chain, name(p, "?")]) for p in sorted(self.parents.get(g, ())))
        return out


_generation = 0
_snapshots: weakref.WeakKeyDictionary[App, Snapshot] = weakref.WeakKeyDictionary()
_WATCHED = (AclGroup, AclMember, AclEntry, User)


def mark_changed(db: AsyncSession) -> None:
    """The ACL changes when this session commits (for changes made with plain statements)."""
    db.sync_session.info["den_acl_changed"] = True


@event.listens_for(Session, "after_flush")
def _after_flush(session: Session, _ctx: Any) -> None:
    # Users count too: a deleted user's id may be given to the next one made.
    if any(isinstance(o, _WATCHED) for o in (*session.new, *session.dirty, *session.deleted)):
        session.info["den_acl_changed"] = True


@event.listens_for(Session, "after_commit")
def _after_commit(session: Session) -> None:
    global _generation
    if session.info.pop("den_acl_changed", False):
        _generation += 1


@event.listens_for(Session, "after_rollback")
def _after_rollback(session: Session) -> None:
    session.info.pop("den_acl_changed", None)


async def snapshot(app: App) -> Snapshot:
    snap = _snapshots.get(app)
    if snap is not None and snap.generation == _generation:
        return snap
    snap = Snapshot(_generation)  # taken before reading: a commit meanwhile reloads again
    async with app.sessions() as db:
        for gid, name in (await db.execute(select(AclGroup.id, AclGroup.name))).all():
            snap.group_names[gid] = name
        rows = await db.execute(
            select(AclMember.group_id, AclMember.user_id, AclMember.member_group_id)
        )
        for gid, uid, mgid in rows.all():
            if uid is not None:
                snap.user_groups.setdefault(uid, set()).add(gid)
            if mgid is not None:
                snap.parents.setdefault(mgid, set()).add(gid)
        users = dict((await db.execute(select(User.id, User.name))).tuples().all())
        for e in (await db.execute(select(AclEntry))).scalars():
            grant = Grant(e.id, "", e.pattern, RIGHTS.index(e.right) + 1, e.source)
            if e.group_id is not None:
                p = f"group:{snap.group_names.get(e.group_id, '?')}"
                snap.by_group.setdefault(e.group_id, []).append(_named(grant, p))
            elif e.user_id is not None:
                p = f"user:{users.get(e.user_id, '?')}"
                snap.by_user.setdefault(e.user_id, []).append(_named(grant, p))
            elif e.anonymous is not None:
                p = f"anonymous-{e.anonymous}"
                snap.anonymous.setdefault(e.anonymous, []).append(_named(grant, p))
    _snapshots[app] = snap
    return snap


def _named(g: Grant, principal: str) -> Grant:
    return Grant(g.entry_id, principal, g.pattern, g.right, g.source)


# -- the decision -------------------------------------------------------------------------


@dataclass
class Decision:
    required: int
    granted: int  # the most any matching entry gives (0: none)
    admin: bool = False
    reasons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return self.admin or self.granted >= self.required


def decide(snap: Snapshot, name: str, required: int, user_id: int | None, place: str) -> Decision:
    """What the entries give a user (None: an anonymous caller) at ``place`` on ``name``."""
    d = Decision(required, 0)
    candidates: list[tuple[Grant, list[str]]] = [(g, []) for g in snap.anonymous.get(place, [])]
    if user_id is not None:
        candidates += [(g, []) for g in snap.by_user.get(user_id, [])]
        for gid, chain in snap.groups_of(user_id).items():
            candidates += [(g, chain) for g in snap.by_group.get(gid, [])]
    for g, chain in candidates:
        if matches(g.pattern, name):
            d.granted = max(d.granted, g.right)
            d.reasons.append(
                {
                    "entry": g.entry_id,
                    "principal": g.principal,
                    "pattern": g.pattern,
                    "right": right_name(g.right),
                    "source": g.source,
                    "through": chain,
                }
            )
    d.reasons.sort(key=lambda r: -RIGHTS.index(r["right"]))
    return d


def check_credential(caller: Caller, m: Method) -> None:
    """The den role's part of a node method's check (den.rpc.registry.check_right): the
    credential must be strong enough; the grant itself is :func:`authorize`'s."""
    if not caller.authenticated:
        return  # the anonymous policy entries decide, at call time
    need = m.right if caller.is_admin else min(m.right, Right.write)
    if caller.right < need:
        # A member's credential is at most 'write': for an admin-right node method
        # the ACL's admin grant is what counts, not a credential they cannot hold.
        raise Forbidden(
            f"{m.name} needs a credential with the '{right_name(need)}' right; "
            f"yours has '{caller.right.name}'"
        )


def permits(snap: Snapshot, caller: Caller, m: Method) -> bool:
    """:func:`authorize`'s verdict against a snapshot in hand, without the error
    (listings: MCP's tools show only node methods the ACL lets the caller call)."""
    if not governs(m.name) or caller.is_admin:
        return True
    return decide(snap, m.name, int(m.right), caller.user_id, where(caller)).allowed


async def authorize(app: App, caller: Caller, m: Method) -> None:
    """Refuse a node method call the ACL does not grant; nothing for other methods."""
    if not governs(m.name) or caller.is_admin:
        return
    place = where(caller)
    d = decide(await snapshot(app), m.name, int(m.right), caller.user_id, place)
    if d.allowed:
        return
    pats = ", ".join(patterns_for(m.name))
    have = right_name(d.granted)
    if not caller.authenticated:
        raise Unauthenticated(
            f"{m.name} needs an identity: call over the unix socket as root or as a den "
            "user's account, or send 'Authorization: Bearer <token>'. Under den's node ACL "
            f"anonymous {place} callers have '{have}' on it and it needs '{m.right.name}' (an "
            f"admin may grant it: den acl grant anonymous-{place} PATTERN RIGHT, PATTERN one "
            f"of {pats})"
        )
    raise Forbidden(
        f"{m.name} needs a node ACL grant of '{m.right.name}' on one of {pats}; "
        f"{caller.name} has '{have}'. An admin may grant it to you or a group of yours "
        f"(den acl grant group:NAME {m.name} {m.right.name}); "
        f"`den acl check {m.name} --user {caller.name}` explains"
    )


# -- acl.toml -----------------------------------------------------------------------------

_Group = Field(pattern=f"^{GROUP_RE}$")
_Pattern = Field(pattern=f"^({PATTERN_RE})$", max_length=128)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileGroup(_Strict):
    name: str = _Group
    description: str = Field("", max_length=200)
    users: list[str] = Field(default_factory=list, max_length=10_000)
    member_groups: list[str] = Field(default_factory=list, max_length=1000)


class FileAce(_Strict):
    right: Literal["read", "write", "admin"]
    methods: list[str] = Field(default_factory=lambda: ["*"], min_length=1, max_length=1000)
    groups: list[str] = Field(default_factory=list, max_length=1000)
    users: list[str] = Field(default_factory=list, max_length=10_000)
    anonymous: list[Literal["local", "remote"]] = Field(default_factory=list, max_length=2)


class FilePolicy(_Strict):
    anonymous_local: Literal["none", "read", "write", "admin"] = "none"
    anonymous_remote: Literal["none", "read", "write", "admin"] = "none"


class AclFile(_Strict):
    group: list[FileGroup] = Field(default_factory=list, max_length=1000)
    ace: list[FileAce] = Field(default_factory=list, max_length=10_000)
    policy: FilePolicy = Field(default_factory=FilePolicy)


class AclFileError(ValueError):
    """acl.toml is not valid: the message names the file, the line and the field."""


def _table_line(text: str, table: str, index: int) -> int | None:
    """The line of the index-th ``[[table]]`` header (1-based), where one can tell."""
    heads = [
        i + 1
        for i, line in enumerate(text.splitlines())
        if re.fullmatch(rf"\s*\[\[\s*{table}\s*\]\]\s*(#.*)?", line)
    ]
    return heads[index] if index < len(heads) else None


def parse_file(path: Path) -> AclFile | None:
    """The file's content, checked; None when there is no file (den runs without one)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AclFileError(f"{path}: cannot be read: {exc.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AclFileError(f"{path}: not valid TOML: {exc}") from None
    try:
        acl = AclFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False, include_input=False)[0]
        loc = [str(p) for p in err["loc"]]
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        where_ = ""
        if len(loc) >= 2 and loc[0] in ("group", "ace") and loc[1].isdigit():
            line = _table_line(text, loc[0], int(loc[1]))
            where_ = f"line {line}: " if line else ""
            field_ = f"[[{loc[0]}]] #{int(loc[1]) + 1}: {'.'.join(loc[2:]) or loc[0]}"
        else:
            field_ = ".".join(loc)
        raise AclFileError(f"{path}: {where_}{field_}: {msg}") from None
    seen: set[str] = set()
    for i, g in enumerate(acl.group):
        if g.name in seen:
            line = _table_line(text, "group", i)
            raise AclFileError(
                f"{path}: line {line}: [[group]] #{i + 1}: name: {g.name!r} is declared twice"
            )
        seen.add(g.name)
    for i, ace in enumerate(acl.ace):
        if not (ace.groups or ace.users or ace.anonymous):
            line = _table_line(text, "ace", i)
            raise AclFileError(
                f"{path}: line {line}: [[ace]] #{i + 1}: names no one: "
                "give groups, users or anonymous"
            )
    return acl


def _cycle(contains: dict[int, set[int]], start: int, target: int) -> bool:
    """Whether ``target`` is reachable from ``start`` through member groups."""
    todo, seen = [start], set()
    while todo:
        g = todo.pop()
        if g == target:
            return True
        if g not in seen:
            seen.add(g)
            todo.extend(contains.get(g, ()))
    return False


def would_cycle(contains: dict[int, set[int]], group: int, member: int) -> bool:
    """Whether making ``member`` a member group of ``group`` closes a loop."""
    return _cycle(contains, member, group)


async def containment(db: AsyncSession) -> dict[int, set[int]]:
    """group -> its member groups, as the database has them."""
    out: dict[int, set[int]] = {}
    rows = await db.execute(
        select(AclMember.group_id, AclMember.member_group_id).where(
            AclMember.member_group_id.is_not(None)
        )
    )
    for gid, mgid in rows.all():
        if mgid is not None:
            out.setdefault(gid, set()).add(mgid)
    return out


def known_pattern(pattern: str, names: Iterable[str]) -> bool:
    return any(matches(pattern, n) for n in names if governs(n))


async def apply_file(db: AsyncSession, acl: AclFile | None, path: Path) -> list[str]:
    """Replace what came from the file with ``acl`` (None: no file); return warnings.

    Groups declared in the file keep their rows (entries and memberships made through
    the API that name them stay); their members and every file entry are replaced."""
    from den.rpc.registry import REGISTRY

    acl = acl or AclFile()
    warnings: list[str] = []
    mark_changed(db)
    groups = {g.name: g for g in (await db.execute(select(AclGroup))).scalars()}
    declared = {g.name for g in acl.group}
    for name in declared:
        if name in groups and groups[name].source != "file":
            raise AclFileError(
                f"{path}: group {name!r} exists already, made through the API: "
                f"rename it in the file, or delete it first (den group rm {name})"
            )
    for name, g in list(groups.items()):
        if g.source == "file" and name not in declared:
            await db.delete(g)
            del groups[name]
    await db.execute(delete(AclMember).where(AclMember.source == "file"))
    await db.execute(delete(AclEntry).where(AclEntry.source == "file"))
    for fg in acl.group:
        row = groups.get(fg.name)
        if row is None:
            row = groups[fg.name] = AclGroup(name=fg.name, source="file", created_by="acl_file")
            db.add(row)
        row.description = fg.description
    await db.flush()
    users = dict((await db.execute(select(User.name, User.id))).tuples().all())

    def user_id(name: str, what: str) -> int | None:
        if name not in users:
            warnings.append(f"{what}: no den user {name[:64]!r}; skipped")
        return users.get(name)

    def group_id(name: str, what: str) -> int | None:
        if name not in groups:
            warnings.append(f"{what}: no group {name[:64]!r}; skipped")
            return None
        return groups[name].id

    contains = await containment(db)
    for fg in acl.group:
        fgid = groups[fg.name].id
        for u in dict.fromkeys(fg.users):
            if (uid := user_id(u, f"group {fg.name}")) is not None:
                db.add(AclMember(group_id=fgid, user_id=uid, source="file"))
        for m in dict.fromkeys(fg.member_groups):
            mgid = group_id(m, f"group {fg.name}")
            if mgid is None:
                continue
            if would_cycle(contains, fgid, mgid):
                raise AclFileError(
                    f"{path}: group {fg.name!r}: member group {m!r} would make a loop "
                    "(a group may not contain itself, directly or through others)"
                )
            contains.setdefault(fgid, set()).add(mgid)
            db.add(AclMember(group_id=fgid, member_group_id=mgid, source="file"))
    aces = list(acl.ace)
    for place in ("local", "remote"):
        right = getattr(acl.policy, f"anonymous_{place}")
        if right != "none":
            aces.append(FileAce(right=right, anonymous=[place]))
    names = list(REGISTRY.methods)
    for i, ace in enumerate(aces):
        what = f"[[ace]] #{i + 1}" if i < len(acl.ace) else "[policy]"
        for pat in dict.fromkeys(ace.methods):
            if not known_pattern(pat, names):
                warnings.append(f"{what}: pattern {pat!r} matches no node method (yet)")
            common = {"pattern": pat, "right": ace.right, "source": "file"}
            for gname in dict.fromkeys(ace.groups):
                if (gid := group_id(gname, what)) is not None:
                    db.add(AclEntry(group_id=gid, created_by="acl_file", **common))
            for u in dict.fromkeys(ace.users):
                if (uid := user_id(u, what)) is not None:
                    db.add(AclEntry(user_id=uid, created_by="acl_file", **common))
            for a in dict.fromkeys(ace.anonymous):
                db.add(AclEntry(anonymous=a, created_by="acl_file", **common))
    await db.flush()
    return warnings


async def load_file(app: App) -> list[str]:
    """Load ``acl_file`` into the database (at start and on acl.reload): the file is
    authoritative for what it declares. Raises AclFileError, changing nothing, if it is
    not valid."""
    path = app.settings.acl_file
    acl = parse_file(path)
    async with app.sessions() as db:
        try:
            warnings = await apply_file(db, acl, path)
        except BaseException:
            await db.rollback()
            raise
        await db.commit()
    return warnings


def file_error(exc: AclFileError) -> InvalidParams:
    return InvalidParams(str(exc), field="acl_file")
