"""Egress exceptions: admins open (or close) destinations for every workspace,
a user's workspaces or one workspace, on top of the default policy of
:mod:`den.net.firewall` (the internet yes; private, link-local, reserved
ranges and the host no).

Rules live in the database; the kernel holds them as elements of interval
sets keyed by workspace address (``network.refresh_exceptions``), recomputed
whenever a rule changes and whenever a workspace gets or gives up its
address, so a rule reaches existing and new workspaces at once and an address
handed to another workspace carries nothing of its former owner's.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field
from sqlalchemy import select

from den.db.models import EgressRule, User, Workspace
from den.errors import Conflict, InvalidParams, NotFound
from den.net.firewall import Exception4
from den.rpc.registry import Cli, CliArg, Context, NoParams, Params, Right, method
from den.services.common import Line, Name, find_user
from den.services.workspaces import find_workspace

if TYPE_CHECKING:
    from den.app import App
    from den.net.network import ExceptionSource

_HOSTNAME = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?")
# Never opened by an allow: the kernel does not forward to them, or an allow
# this broad is a typo for something narrower.
_UNROUTABLE = tuple(
    ipaddress.IPv4Network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4")
)
MIN_ALLOW_PREFIX = 8


class EgressSpec(Params):
    dest: Annotated[str, CliArg()] = Field(
        max_length=64,
        description="Destination: an IPv4 address or CIDR. Hostnames are refused "
        "(a name may resolve elsewhere tomorrow; rules are addresses).",
    )
    user: Name | None = Field(None, description="Only this user's workspaces.")
    workspace: str | None = Field(
        None, max_length=80, description="Only this workspace (OWNER/NAME)."
    )
    port: int | None = Field(
        None, ge=1, le=65535, description="Only this port (with --proto, else TCP and UDP)."
    )
    proto: Literal["tcp", "udp"] | None = Field(None, description="Only this protocol.")
    note: Line = Field("", max_length=200, description="Why (shown by `den egress ls`).")


class EgressRemove(Params):
    id: Annotated[int, CliArg()] = Field(ge=1, description="The rule's id (`den egress ls`).")


class EgressOut(BaseModel):
    id: int
    action: str
    dest: str
    proto: str | None
    port: int | None
    scope: str  # "all", "user:NAME" or "workspace:OWNER/NAME"
    note: str
    created_by: str
    created_at: datetime


def _dest(text: str, action: str) -> str:
    """The destination as a CIDR, or a -32602 naming ``dest``."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError:
        try:
            ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            pass
        else:
            raise InvalidParams(
                f"{text!r} has host bits set; write the network (e.g. "
                f"{ipaddress.ip_network(text.strip(), strict=False)}) or one address",
                field="dest",
            ) from None
        if _HOSTNAME.fullmatch(text.strip()) and not text.strip().replace(".", "").isdigit():
            raise InvalidParams(
                f"{text[:64]!r} is a hostname: give an IPv4 address or CIDR "
                "(den does not resolve names in rules; `getent hosts NAME` shows its addresses)",
                field="dest",
            ) from None
        raise InvalidParams(
            f"{text[:64]!r} is not an IPv4 address or CIDR (e.g. 192.168.1.10 or 10.1.0.0/16)",
            field="dest",
        ) from None
    if net.version != 4:
        raise InvalidParams(
            "workspaces have no IPv6 and none is forwarded: give an IPv4 address or CIDR",
            field="dest",
        )
    if action == "allow":
        if net.prefixlen < MIN_ALLOW_PREFIX:
            raise InvalidParams(
                f"{net} would open every private and link-local range at once; allow the "
                f"networks you mean (at most a /{MIN_ALLOW_PREFIX} each)",
                field="dest",
            )
        if any(net.overlaps(u) for u in _UNROUTABLE):
            raise InvalidParams(
                f"{net} is loopback, multicast or reserved: the host does not forward there",
                field="dest",
            )
    return str(net)


async def _scope(ctx: Context, p: EgressSpec) -> tuple[User | None, Workspace | None, str]:
    if p.user is not None and p.workspace is not None:
        raise InvalidParams("give a user or a workspace, not both", field="workspace")
    # The usual lookups; what they refuse is a bad field of this rule.
    if p.user is not None:
        try:
            user = await find_user(ctx, p.user)
        except NotFound as exc:
            raise InvalidParams(exc.message, field="user") from None
        return user, None, f"user:{user.name}"
    if p.workspace is not None:
        try:
            ws, owner = await find_workspace(ctx, p.workspace)
        except (NotFound, Conflict, InvalidParams) as exc:
            raise InvalidParams(exc.message, field="workspace") from None
        return None, ws, f"workspace:{owner.name}/{ws.name}"
    return None, None, "all"


def _out(r: EgressRule, scope: str) -> EgressOut:
    return EgressOut(
        id=r.id,
        action=r.action,
        dest=r.dest,
        proto=r.proto,
        port=r.port,
        scope=scope,
        note=r.note,
        created_by=r.created_by,
        created_at=r.created_at,
    )


async def _scopes(ctx: Context, rules: list[EgressRule]) -> dict[int, str]:
    users = dict((await ctx.db.execute(select(User.id, User.name))).tuples().all())
    wss = {
        ws_id: f"{users.get(uid, '?')}/{name}"
        for ws_id, uid, name in (
            await ctx.db.execute(select(Workspace.id, Workspace.user_id, Workspace.name))
        ).tuples()
    }
    out = {}
    for r in rules:
        if r.workspace_id is not None:
            out[r.id] = f"workspace:{wss.get(r.workspace_id, '?')}"
        elif r.user_id is not None:
            out[r.id] = f"user:{users.get(r.user_id, '?')}"
        else:
            out[r.id] = "all"
    return out


async def _add(ctx: Context, p: EgressSpec, action: Literal["allow", "deny"]) -> EgressOut:
    dest = _dest(p.dest, action)
    user, ws, scope = await _scope(ctx, p)
    ctx.target = f"egress:{action} {dest} {scope}"[:200]
    same = select(EgressRule.id).where(
        EgressRule.action == action,
        EgressRule.dest == dest,
        EgressRule.proto.is_(None) if p.proto is None else EgressRule.proto == p.proto,
        EgressRule.port.is_(None) if p.port is None else EgressRule.port == p.port,
        EgressRule.user_id.is_(None) if user is None else EgressRule.user_id == user.id,
        EgressRule.workspace_id.is_(None) if ws is None else EgressRule.workspace_id == ws.id,
    )
    dup = (await ctx.db.execute(same)).scalar()
    if dup is not None:
        raise Conflict(f"this rule exists already (id {dup})")
    rule = EgressRule(
        action=action,
        dest=dest,
        proto=p.proto,
        port=p.port,
        user_id=user.id if user else None,
        workspace_id=ws.id if ws else None,
        note=p.note,
        created_by=ctx.caller.name,
    )
    ctx.db.add(rule)
    await ctx.db.commit()
    await ctx.app.network.refresh_exceptions()
    return _out(rule, scope)


@method("egress.allow", right=Right.admin, cli=Cli("egress allow"))
async def egress_allow(ctx: Context, p: EgressSpec) -> EgressOut:
    """Open a destination the default egress policy closes (private, link-local ranges).

    For every workspace, a user's workspaces or one workspace; a port (TCP and
    UDP unless --proto) or every port. Takes effect at once on running
    workspaces. The host's own addresses stay closed (den's listeners aside).
    """
    return await _add(ctx, p, "allow")


@method("egress.deny", right=Right.admin, cli=Cli("egress deny"))
async def egress_deny(ctx: Context, p: EgressSpec) -> EgressOut:
    """Close a destination the default policy leaves open (e.g. a LAN on public addresses).

    A deny wins over any allow.
    """
    return await _add(ctx, p, "deny")


@method(
    "egress.list",
    right=Right.admin,
    cli=Cli("egress ls", columns=("id", "action", "dest", "proto", "port", "scope", "note")),
)
async def egress_list(ctx: Context, p: NoParams) -> list[EgressOut]:
    """List the egress rules: what admins opened or closed, for whom."""
    rules = list((await ctx.db.execute(select(EgressRule).order_by(EgressRule.id))).scalars())
    scopes = await _scopes(ctx, rules)
    return [_out(r, scopes[r.id]) for r in rules]


@method("egress.remove", right=Right.admin, cli=Cli("egress rm"))
async def egress_remove(ctx: Context, p: EgressRemove) -> EgressOut:
    """Remove an egress rule by id; workspaces lose (or regain) the destination at once."""
    ctx.target = f"egress:{p.id}"
    rule = await ctx.db.get(EgressRule, p.id)
    if rule is None:
        raise NotFound(f"no egress rule {p.id}; `den egress ls` lists them")
    out = _out(rule, (await _scopes(ctx, [rule]))[rule.id])
    await ctx.db.delete(rule)
    await ctx.db.commit()
    await ctx.app.network.refresh_exceptions()
    return out


def exception_source(app: App) -> ExceptionSource:
    """What the network asks for the exceptions of every workspace with an address."""

    async def current() -> list[Exception4]:
        async with app.sessions() as db:
            rules = list((await db.execute(select(EgressRule))).scalars())
            rows = (
                await db.execute(
                    select(Workspace.id, Workspace.user_id, Workspace.address).where(
                        Workspace.address.is_not(None), Workspace.state != "deleting"
                    )
                )
            ).tuples()
            workspaces = [(ws_id, uid, addr) for ws_id, uid, addr in rows if addr]
        out = []
        for r in rules:
            for ws_id, uid, addr in workspaces:
                if (r.workspace_id or ws_id) != ws_id or (r.user_id or uid) != uid:
                    continue
                proto: Literal["tcp", "udp"] | None = (
                    "tcp" if r.proto == "tcp" else "udp" if r.proto == "udp" else None
                )
                # A port without a protocol: that port over TCP and UDP.
                protos: list[Literal["tcp", "udp"] | None] = (
                    [proto] if proto or r.port is None else ["tcp", "udp"]
                )
                action: Literal["allow", "deny"] = "deny" if r.action == "deny" else "allow"
                for pr in protos:
                    out.append(Exception4(action, addr, r.dest, pr, r.port))
        return out

    return current
