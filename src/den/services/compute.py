"""The compute manager's calls, acting on a user's workspace named "default"."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field

from den.errors import NotFound
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services.common import Name, user_or_self
from den.services.power import workspace_start, workspace_stop
from den.services.workspaces import (
    DEFAULT_NAME,
    Deleted,
    WorkspaceOut,
    WsCreate,
    WsRef,
    find_workspace,
    workspace_create,
    workspace_delete,
    workspace_get,
    ws_out_urls,
)


class UserWs(Params):
    # user_id: the name the compute manager's own clients send.
    user: Annotated[Name | None, CliArg()] = Field(
        None,
        validation_alias=AliasChoices("user", "user_id"),
        description="The user (default: you; also accepted as user_id).",
    )


async def _default_ref(ctx: Context, user: str | None) -> str:
    owner = await user_or_self(ctx, user)
    return f"{owner.name}/{DEFAULT_NAME}"


@method("user.provision", right=Right.write, cli=Cli("user provision"))
async def user_provision(ctx: Context, p: UserWs) -> WorkspaceOut:
    """Create and start the user's default workspace (named "default") if missing."""
    owner = await user_or_self(ctx, p.user)
    try:
        ws, _ = await find_workspace(ctx, f"{owner.name}/{DEFAULT_NAME}")
        return await ws_out_urls(ctx, ws, owner.name)
    except NotFound:
        pass
    user = owner.name if owner.id != ctx.caller.user_id else None
    return await workspace_create(ctx, WsCreate(name=DEFAULT_NAME, user=user))


@method("user.deprovision", right=Right.write, cli=Cli("user deprovision"))
async def user_deprovision(ctx: Context, p: UserWs) -> Deleted:
    """Delete the user's default workspace."""
    return await workspace_delete(ctx, WsRef(ref=await _default_ref(ctx, p.user)))


@method("user.vm", right=Right.read, cli=Cli("user vm"))
async def user_vm(ctx: Context, p: UserWs) -> WorkspaceOut:
    """Show the user's default workspace."""
    return await workspace_get(ctx, WsRef(ref=await _default_ref(ctx, p.user)))


@method("user.start", right=Right.write, cli=Cli("user start"))
async def user_start(ctx: Context, p: UserWs) -> WorkspaceOut:
    """Start the user's default workspace."""
    return await workspace_start(ctx, WsRef(ref=await _default_ref(ctx, p.user)))


@method("user.stop", right=Right.write, cli=Cli("user stop"))
async def user_stop(ctx: Context, p: UserWs) -> WorkspaceOut:
    """Stop the user's default workspace."""
    return await workspace_stop(ctx, WsRef(ref=await _default_ref(ctx, p.user)))
