"""The UI allow-list: which client addresses may reach den's dashboard and API
over TCP. Kept in the database; enforced by den.web.allow, which reads it again
on the next request after any change here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field
from sqlalchemy import delete, select

from den.db.models import UiAllow
from den.errors import InvalidParams, NotFound
from den.rpc.registry import Cli, CliArg, CliOpt, Context, NoParams, Params, Right, method
from den.services.common import Line
from den.web import allow

ADDR = "An IP address (192.0.2.7, 2001:db8::7) or a CIDR network (10.1.0.0/16)."


class UiEntry(BaseModel):
    network: str = Field(description="An address, or a network in CIDR notation.")
    note: str
    created_by: str
    created_at: datetime


class UiAllowParams(Params):
    addr: Annotated[str | None, CliArg()] = Field(None, max_length=64, description=ADDR)
    me: Annotated[bool, CliOpt(flags=("--me",), flag_value=True)] = Field(
        False,
        description="Your own address, as den sees this call (the den CLI on the unix "
        "socket takes it from $SSH_CONNECTION).",
    )
    note: Line = Field("", max_length=200, description="Why (shown by `den ui list`).")


class UiRemoveParams(Params):
    addr: Annotated[str, CliArg()] = Field(max_length=64, description=ADDR)


class UiOpened(BaseModel):
    removed: int = Field(description="How many entries the list had.")


def _entry(row: UiAllow) -> UiEntry:
    return UiEntry(
        network=row.network, note=row.note, created_by=row.created_by, created_at=row.created_at
    )


@method(
    "ui.list",
    right=Right.admin,
    cli=Cli("ui list", columns=("network", "note", "created_by", "created_at")),
)
async def ui_list(ctx: Context, p: NoParams) -> list[UiEntry]:
    """List the addresses allowed to reach the dashboard and API over TCP (none: every address)."""
    rows = (await ctx.db.execute(select(UiAllow).order_by(UiAllow.id))).scalars()
    return [_entry(r) for r in rows]


@method(
    "ui.allow",
    right=Right.admin,
    cli=Cli(
        "ui allow",
        note="Only listed addresses reach the dashboard and API over TCP now; "
        "the unix socket and den's ssh shell stay open to admins.",
    ),
)
async def ui_allow(ctx: Context, p: UiAllowParams) -> UiEntry:
    """Let an address or network reach the dashboard and API over TCP; once the list
    has an entry, every other address is refused (the unix socket always works).

    Takes effect on the next request, without a restart.
    """
    if p.me and p.addr is not None:
        raise InvalidParams("give ADDR or --me, not both", field="addr")
    if p.me:
        if not ctx.caller.addr:
            raise InvalidParams(
                "den does not know your address on this connection (the unix socket has "
                "none): give ADDR (the den CLI's --me reads it from $SSH_CONNECTION, set "
                "when you are logged in over ssh)",
                field="me",
            )
        net = allow.network(ctx.caller.addr, field="me")
    elif p.addr is None:
        raise InvalidParams("give ADDR (an address or CIDR network) or --me", field="addr")
    else:
        net = allow.network(p.addr)
    ctx.target = f"ui:{net}"
    row = (await ctx.db.execute(select(UiAllow).where(UiAllow.network == net))).scalar()
    if row is None:
        row = UiAllow(network=net, note=p.note, created_by=ctx.caller.name)
        ctx.db.add(row)
        await ctx.db.commit()
        allow.invalidate(ctx.app)
    return _entry(row)


@method("ui.remove", right=Right.admin, cli=Cli("ui remove"))
async def ui_remove(ctx: Context, p: UiRemoveParams) -> UiEntry:
    """Take an address or network off the list (the last one gone: every address may connect)."""
    net = allow.network(p.addr)
    ctx.target = f"ui:{net}"
    row = (await ctx.db.execute(select(UiAllow).where(UiAllow.network == net))).scalar()
    if row is None:
        raise NotFound(f"{net} is not on the UI allow-list; `den ui list` shows it")
    out = _entry(row)
    await ctx.db.delete(row)
    await ctx.db.commit()
    allow.invalidate(ctx.app)
    return out


@method("ui.open", right=Right.admin, cli=Cli("ui open"))
async def ui_open(ctx: Context, p: NoParams) -> UiOpened:
    """Clear the list: every address may reach the dashboard and API over TCP again."""
    ctx.target = "ui:*"
    result = await ctx.db.execute(delete(UiAllow))
    await ctx.db.commit()
    allow.invalidate(ctx.app)
    return UiOpened(removed=int(getattr(result, "rowcount", 0) or 0))
