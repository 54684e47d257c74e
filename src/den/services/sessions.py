"""Live SSH sessions: who is connected to what, and ending a session."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from den.errors import InvalidParams, NotFound
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services.common import Name
from den.ssh import info as _info  # noqa: F401  (registers system.info and ssh.config)
from den.ssh.table import SshSession


class SessionOut(BaseModel):
    id: str
    user: str
    workspace: str
    kind: str
    client: str
    started_at: datetime
    bytes_in: int
    bytes_out: int
    channels: int
    requests: int = Field(0, description="Requests made (kind http: a recent web visit).")


class SessionList(Params):
    user: Name | None = Field(
        None, description="Only this user's sessions (members: only their own)."
    )


class SessionKill(Params):
    id: Annotated[str | None, CliArg()] = Field(None, max_length=32, description="Session id.")
    user: Name | None = Field(None, description="End every session of this user instead.")


class Killed(BaseModel):
    killed: list[str]


def _out(s: SshSession) -> SessionOut:
    return SessionOut(
        id=s.id,
        user=s.user,
        workspace=s.workspace,
        kind=s.kind,
        client=s.client,
        started_at=s.started_at,
        bytes_in=s.bytes_in,
        bytes_out=s.bytes_out,
        channels=s.channels,
    )


@method(
    "session.list",
    right=Right.read,
    cli=Cli(
        "sessions",
        columns=(
            "id",
            "user",
            "workspace",
            "kind",
            "client",
            "started_at",
            "bytes_in",
            "bytes_out",
            "requests",
        ),
    ),
)
async def session_list(ctx: Context, p: SessionList) -> list[SessionOut]:
    """List live SSH sessions: everyone's for admins, your own for members."""
    user = p.user
    if not ctx.caller.is_admin:
        if user is not None and user != ctx.caller.name:
            return []
        user = ctx.caller.name
    return [_out(s) for s in ctx.app.ssh_sessions.list(user)] + _web_visits(ctx, user)


def _web_visits(ctx: Context, user: str | None) -> list[SessionOut]:
    """Recent visits to workspace URLs (kind ``http``): a member sees visits to their
    workspaces and their own; an admin everyone's (or one user's with --user)."""
    gate = ctx.app.gate
    if gate is None:
        return []
    out = []
    for v in gate.visits.live():
        owner = v.workspace.partition("/")[0]
        if user is not None and user not in (v.user, owner):
            continue
        out.append(
            SessionOut(
                id=v.id,
                user=v.user or f"({v.how})",
                workspace=v.workspace,
                kind="http",
                client=v.client,
                started_at=v.started_at,
                bytes_in=0,
                bytes_out=0,
                channels=0,
                requests=v.requests,
            )
        )
    return out


@method("session.kill", right=Right.write, cli=Cli("kill"))
async def session_kill(ctx: Context, p: SessionKill) -> Killed:
    """End an SSH session by id, or every session of a user (--user); closes at once."""
    if (p.id is None) == (p.user is None):
        raise InvalidParams("give a session id or --user NAME (one of them)", field="id")
    table = ctx.app.ssh_sessions
    mine = not ctx.caller.is_admin
    if p.id is not None:
        ctx.target = f"session:{p.id}"
        s = table.get(p.id)
        if s is None or (mine and s.user != ctx.caller.name):
            raise NotFound(f"no session {p.id!r}; `den sessions` lists them")
        victims = [s]
    else:
        assert p.user is not None
        ctx.target = f"user:{p.user}"
        if mine and p.user != ctx.caller.name:
            raise NotFound(f"no user named {p.user!r}")
        victims = table.list(p.user)
    for s in victims:
        s.close()
    return Killed(killed=[s.id for s in victims])
