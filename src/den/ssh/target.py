"""What a login name means, and getting the workspace it names ready.

``ssh NAME@host`` is the caller's workspace NAME; ``ssh OWNER.NAME@host`` (or
``OWNER+NAME``) is OWNER's workspace NAME, for admins and for OWNER; any other
name (one that is none of the caller's workspaces, such as the local user
name ssh sends by default) opens the den shell. ``root+`` before any of these
(``root+NAME``, ``root+OWNER.NAME``) enters the same workspace as root inside
instead of the owner's account ("root" is no den user's name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import select

from den.db.models import SshKey, User, Workspace
from den.errors import Conflict, Unauthenticated
from den.rpc.registry import REGISTRY, Caller, Context, Right
from den.services.power import ensure_running
from den.services.workspaces import find_workspace, spec_of

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App
    from den.backends.base import Spec, State

NAME = r"[a-z][a-z0-9-]{0,30}"
QUALIFIED_RE = re.compile(rf"({NAME})[.+]({NAME})")
NAME_RE = re.compile(NAME)
AS_ROOT = "root+"


def caller_of(user: User) -> Caller:
    right = Right.admin if user.role == "admin" else Right.write
    return Caller(user.name, user.role, right, "ssh", user_id=user.id)


async def current_caller(app: App, user_id: int | None, fingerprint: str) -> Caller:
    """The caller a connection stands for now: its key must still be the user's,
    and the role is today's, not the one at login."""
    async with app.sessions() as db:
        q = (
            select(User)
            .join(SshKey, SshKey.user_id == User.id)
            .where(User.id == user_id, SshKey.fingerprint == fingerprint)
        )
        user = (await db.execute(q)).scalar_one_or_none()
    if user is None:
        raise Unauthenticated("the key this ssh connection logged in with is no longer valid")
    return caller_of(user)


def as_root(login: str) -> bool:
    """Whether the login asks for root inside the workspace (``root+...``)."""
    return login.startswith(AS_ROOT) and parse_login(login) is not None


def parse_login(login: str) -> tuple[str | None, str] | None:
    """(owner or None, workspace name) the login names, or None for the den shell."""
    login = login.removeprefix(AS_ROOT)
    m = QUALIFIED_RE.fullmatch(login)
    if m:
        return m.group(1), m.group(2)
    if NAME_RE.fullmatch(login):
        return None, login
    return None


class Denied(Exception):
    """The key is a den user's, but the login names nothing that user may enter."""


async def resolve(db: AsyncSession, user: User, login: str) -> str | None:
    """ "OWNER/NAME" of the workspace ``login`` takes ``user`` into, or None (den shell).

    Raises :class:`Denied` for OWNER.NAME (or root+...) that is not the user's
    to enter or does not exist.
    """
    parsed = parse_login(login)
    if parsed is None:
        return None
    owner, name = parsed
    explicit = owner is not None or as_root(login)
    owner = owner or user.name
    if owner != user.name and user.role != "admin":
        raise Denied(f"{user.name} may not enter {owner}'s workspaces")
    q = (
        select(Workspace.id)
        .join(User, Workspace.user_id == User.id)
        .where(User.name == owner, Workspace.name == name, Workspace.state != "deleting")
    )
    if (await db.execute(q)).first() is None:
        if explicit:
            raise Denied(f"no workspace {owner}/{name}")
        return None
    return f"{owner}/{name}"


@dataclass(frozen=True)
class Ready:
    """A running workspace, as a session needs it."""

    ws_id: str
    ref: str
    spec: Spec
    address: str
    state: State = field(default_factory=dict)  # the backend's blob (den.backends.base)


async def ready(app: App, caller: Caller, ref: str) -> Ready:
    """The workspace, running: a suspended one is resumed; a stopped one started
    when ``ssh_start_stopped``. Raises a :class:`DenError` the client is told.
    """
    ctx = Context(app, caller, REGISTRY.get("workspace.resume"))
    try:
        ws, owner = await find_workspace(ctx, ref)
        if ws.state in ("stopped", "failed"):
            if not app.settings.ssh_start_stopped:
                raise Conflict(f"workspace {ref} is {ws.state}; start it with `den start {ref}`")
            await ctx.db.rollback()
            await REGISTRY.call(app, caller, "workspace.start", {"ref": ref})
            ws, owner = await find_workspace(ctx, ref)
        await ensure_running(ctx, ws, owner, "ssh")
        spec = spec_of(app, ws, owner)
        return Ready(ws.id, ref, spec, ws.address or "", dict(ws.backend_state or {}))
    finally:
        if ctx._db is not None:
            await ctx._db.close()
