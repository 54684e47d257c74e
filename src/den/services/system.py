"""Health and identity."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel

from den import __version__
from den.rpc.registry import Cli, Context, NoParams, Right, method


class Health(BaseModel):
    status: str
    version: str
    instance: int
    uptime_s: float


@method("rpc.health", right=Right.public, cli=Cli("health"))
async def health(ctx: Context, p: NoParams) -> Health:
    """Report that the daemon is up, its version, instance and uptime."""
    up = (datetime.now(UTC) - ctx.app.started_at).total_seconds()
    return Health(status="ok", version=__version__, instance=ctx.app.settings.instance, uptime_s=up)


class WhoAmI(BaseModel):
    name: str
    role: str
    right: str
    via: str
    token: str | None


@method("auth.whoami", right=Right.public, cli=Cli("whoami"))
async def whoami(ctx: Context, p: NoParams) -> WhoAmI:
    """Say who the daemon takes the caller to be, with which role and right."""
    c = ctx.caller
    return WhoAmI(name=c.name, role=c.role, right=c.right.name, via=c.via, token=c.token_id)
