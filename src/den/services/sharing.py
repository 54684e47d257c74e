"""Who may open a workspace's URLs, and which ports they lead to.

A workspace's URLs are private (its owner and admins), shared with named den
users, or public; secret links let whoever holds one in, whatever the mode,
until they are revoked. Only the owner or an admin sees or changes any of it.
The web gate reads the same rows through :func:`access` and :func:`link_ok`;
every committed change is followed by ``app.web_changed()`` so that nothing it
cached outlives the change.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from den.db.models import PublishedPort, ShareLink, ShareUser, User, Workspace
from den.errors import Conflict, InvalidParams, NotFound
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services.common import Line, Name, parse_when
from den.services.tokens import hash_secret
from den.services.workspaces import find_workspace, published_ports, ws_urls
from den.web.urls import workspace_url

if TYPE_CHECKING:
    from den.app import App

Mode = Literal["private", "users", "public"]
# Past these a list is a script gone wrong, and the gate's per-request load grows.
MAX_SHARE_USERS = 200
MAX_LINKS = 100  # active ones per workspace
MAX_PORTS = 32
LINK_PARAM = "den_share"


# -- what the gate uses ------------------------------------------------------------


@dataclass(frozen=True)
class ShareState:
    """Who may open a workspace's URLs, besides admins and share-link holders."""

    ws_id: str
    owner_id: int
    mode: str  # private | users | public
    user_ids: frozenset[int]  # the named users (they count in mode "users" only)

    def allows(self, user_id: int | None, is_admin: bool) -> bool:
        """Whether a signed-in den user (or nobody: None) may open the URLs."""
        if self.mode == "public" or is_admin:
            return True
        if user_id is None:
            return False
        return user_id == self.owner_id or (self.mode == "users" and user_id in self.user_ids)


async def access(app: App, ws_id: str) -> ShareState | None:
    """The sharing of workspace ``ws_id`` in one query; None when there is no such workspace."""
    async with app.sessions() as db:
        rows = (
            await db.execute(
                select(Workspace.user_id, Workspace.share_mode, ShareUser.user_id)
                .outerjoin(ShareUser, ShareUser.workspace_id == Workspace.id)
                .where(Workspace.id == ws_id)
            )
        ).all()
    if not rows:
        return None
    owner_id, mode = rows[0][0], rows[0][1]
    return ShareState(ws_id, owner_id, mode, frozenset(r[2] for r in rows if r[2] is not None))


def _split(value: str) -> tuple[str, str] | None:
    lid, sep, secret = value.partition("_")
    if not sep or not lid or not secret or len(value) > 200:
        return None
    return lid, secret


async def link_ok(app: App, ws_id: str, value: str) -> str | None:
    """The link's id when ``value`` (``ID_SECRET``) is a live share link of ``ws_id``, else None."""
    parts = _split(value)
    if parts is None:
        return None
    lid, secret = parts
    async with app.sessions() as db:
        link = await db.get(ShareLink, lid)
    if link is None or link.workspace_id != ws_id:
        return None
    if not hmac.compare_digest(link.secret_hash, hash_secret(secret)):
        return None
    return lid if _link_state(link, datetime.now(UTC)) == "active" else None


# -- results -------------------------------------------------------------------------


class LinkOut(BaseModel):
    id: str
    note: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    state: str = Field(description="active, expired or revoked.")


class LinkCreated(LinkOut):
    url: str = Field(description="The secret link: shown this once, never again.")


class ShareOut(BaseModel):
    ref: str
    mode: str
    reach: str = Field(description="Who can open its URLs, in words.")
    users: list[str] = Field(description="Den users it is shared with (mode users).")
    links: list[LinkOut] = Field(description="Its share links (secrets are never shown again).")
    http_port: int = Field(description="The port its main URL leads to.")
    ports: list[int] = Field(description="Further published ports, each with a URL.")
    url: str
    urls: list[str] = Field(description="The main URL, then the published ports'.")


def _link_state(link: ShareLink, now: datetime) -> str:
    if link.revoked_at is not None:
        return "revoked"
    if link.expires_at is not None and link.expires_at <= now:
        return "expired"
    return "active"


def _link_out(link: ShareLink, now: datetime) -> LinkOut:
    return LinkOut(
        id=link.id,
        note=link.note,
        created_by=link.created_by,
        created_at=link.created_at,
        expires_at=link.expires_at,
        revoked_at=link.revoked_at,
        state=_link_state(link, now),
    )


def _reach(owner: str, mode: str, users: list[str], active_links: int) -> str:
    if mode == "public":
        text = "anyone who has the URL"
    elif mode == "users" and users:
        text = f"{owner} (owner), admins and {', '.join(users)}"
    else:
        text = f"{owner} (owner) and admins"
    if active_links and mode != "public":
        text += f"; also whoever holds one of its {active_links} active share link(s)"
    return text


async def _share_out(ctx: Context, ws: Workspace, owner: User) -> ShareOut:
    db = ctx.db
    users = list(
        (
            await db.execute(
                select(User.name)
                .join(ShareUser, ShareUser.user_id == User.id)
                .where(ShareUser.workspace_id == ws.id)
                .order_by(User.name)
            )
        ).scalars()
    )
    links = list(
        (
            await db.execute(
                select(ShareLink)
                .where(ShareLink.workspace_id == ws.id)
                .order_by(ShareLink.created_at, ShareLink.id)
            )
        ).scalars()
    )
    ports = (await published_ports(db, [ws.id])).get(ws.id, [])
    now = datetime.now(UTC)
    outs = [_link_out(link, now) for link in links]
    urls = ws_urls(ctx.app.settings, ws, owner.name, ports)
    return ShareOut(
        ref=f"{owner.name}/{ws.name}",
        mode=ws.share_mode,
        reach=_reach(owner.name, ws.share_mode, users, sum(o.state == "active" for o in outs)),
        users=users,
        links=outs,
        http_port=ws.http_port,
        ports=ports,
        url=urls[0],
        urls=urls,
    )


async def _owned(ctx: Context, ref: str, *, deleting: bool = False) -> tuple[Workspace, User]:
    """The workspace, for its owner or an admin only (others: not found, as everywhere)."""
    ws, owner = await find_workspace(ctx, ref, deleting=deleting)
    if not ctx.caller.is_admin and ctx.caller.user_id != owner.id:
        raise NotFound(f"no workspace {ref!r}")
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    return ws, owner


async def _changed(ctx: Context) -> None:
    """Commit, then tell the gate; a concurrent change of the same rows is a clear conflict."""
    try:
        await ctx.db.commit()
    except IntegrityError:
        await ctx.db.rollback()
        raise Conflict(
            "the workspace's sharing or ports changed at the same time (or it, or a user "
            "named, was deleted); look again and retry"
        ) from None
    ctx.app.web_changed()


# -- params ---------------------------------------------------------------------------


class ShareRef(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")


class ShareSet(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    mode: Mode | None = Field(
        None,
        description="private (owner and admins), users (and the users named with --add) or "
        "public (anyone). Adding users to a private workspace makes it 'users'.",
    )
    add: list[Name] = Field(
        default_factory=list, max_length=MAX_SHARE_USERS, description="Share with this den user."
    )
    remove: list[Name] = Field(
        default_factory=list,
        max_length=MAX_SHARE_USERS,
        description="Stop sharing with this den user.",
    )


class LinkCreate(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    note: Line = Field("", max_length=200, description="Who or what the link is for.")
    expires: str | None = Field(
        None,
        max_length=64,
        description="Expiry: a duration (7d, 12h) or an ISO 8601 time (default: until revoked).",
    )


class LinkRef(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    id: Annotated[str, CliArg()] = Field(
        max_length=32, description="The link's id (`den share NAME` lists them)."
    )


class PortSet(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    port: Annotated[int, CliArg()] = Field(ge=1, le=65535, description="A TCP port, 1-65535.")


# -- sharing ------------------------------------------------------------------------------


@method("share.show", right=Right.read, cli=Cli("share-show"))
async def share_show(ctx: Context, p: ShareRef) -> ShareOut:
    """Who can open a workspace's URLs: its mode, named users, share links and URLs.

    `den share NAME` without options shows the same (and needs the write right).
    """
    ws, owner = await _owned(ctx, p.ref, deleting=True)
    return await _share_out(ctx, ws, owner)


async def _users(ctx: Context, names: list[str], field: str) -> dict[str, User]:
    found = {
        u.name: u
        for u in (await ctx.db.execute(select(User).where(User.name.in_(names)))).scalars()
    }
    for n in names:
        if n not in found:
            raise InvalidParams(f"no den user named {n!r}", field=field)
    return found


@method("share.set", right=Right.write, cli=Cli("share"))
async def share_set(ctx: Context, p: ShareSet) -> ShareOut:
    """Show or change who can open a workspace's URLs.

    Without options it shows the mode, the users it is shared with, its share
    links and its URLs. --mode private|users|public, --add USER, --remove USER
    (repeatable) change it at once, for new requests and cached ones alike.
    """
    if not (p.mode or p.add or p.remove):
        ws, owner = await _owned(ctx, p.ref, deleting=True)
        return await _share_out(ctx, ws, owner)
    ws, owner = await _owned(ctx, p.ref)
    both = set(p.add) & set(p.remove)
    if both:
        raise InvalidParams(f"{sorted(both)[0]!r} is both added and removed", field="remove")
    added = await _users(ctx, sorted(set(p.add)), "add")
    for u in added.values():
        if u.id == owner.id:
            raise InvalidParams(
                f"{u.name} owns {owner.name}/{ws.name}: an owner always reaches it", field="add"
            )
        if u.id == ctx.caller.user_id:
            raise InvalidParams(
                "sharing with yourself changes nothing: admins reach every workspace", field="add"
            )
    removed = await _users(ctx, sorted(set(p.remove)), "remove")
    current = set(
        (
            await ctx.db.execute(select(ShareUser.user_id).where(ShareUser.workspace_id == ws.id))
        ).scalars()
    )
    for u in removed.values():
        if u.id not in current:
            raise InvalidParams(
                f"{owner.name}/{ws.name} is not shared with {u.name}", field="remove"
            )
    new = [u for u in added.values() if u.id not in current]
    if len(current) + len(new) - len(removed) > MAX_SHARE_USERS:
        raise InvalidParams(
            f"a workspace is shared with at most {MAX_SHARE_USERS} users", field="add"
        )
    for u in new:
        ctx.db.add(ShareUser(workspace_id=ws.id, user_id=u.id))
    for u in removed.values():
        row = await ctx.db.get(ShareUser, (ws.id, u.id))
        if row is not None:
            await ctx.db.delete(row)
    if p.mode is not None:
        ws.share_mode = p.mode
    elif added and ws.share_mode == "private":
        ws.share_mode = "users"  # naming users means they should get in
    await _changed(ctx)
    return await _share_out(ctx, ws, owner)


@method(
    "share.link",
    right=Right.write,
    cli=Cli(
        "share-link",
        note="Keep the link now: den stores only its hash and cannot show it again.",
    ),
)
async def share_link(ctx: Context, p: LinkCreate) -> LinkCreated:
    """Make a secret link to a workspace's URLs: whoever opens it gets in, until revoked.

    It works whatever the share mode; `den share-unlink NAME ID` revokes it.
    """
    ws, owner = await _owned(ctx, p.ref)
    expires = parse_when(p.expires, field="expires", future=True) if p.expires else None
    if expires is not None and expires <= datetime.now(UTC):
        raise InvalidParams("the expiry is in the past", field="expires")
    now = datetime.now(UTC)
    live = (
        await ctx.db.execute(
            select(func.count(ShareLink.id)).where(
                ShareLink.workspace_id == ws.id,
                ShareLink.revoked_at.is_(None),
                (ShareLink.expires_at.is_(None)) | (ShareLink.expires_at > now),
            )
        )
    ).scalar_one()
    if live >= MAX_LINKS:
        raise Conflict(
            f"{owner.name}/{ws.name} has {live} active share links, the most it may have; "
            "revoke some with `den share-unlink`"
        )
    lid = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    link = ShareLink(
        id=lid,
        workspace_id=ws.id,
        secret_hash=hash_secret(secret),
        note=p.note,
        created_by=ctx.caller.name,
        created_at=now,
        expires_at=expires,
    )
    ctx.db.add(link)
    await _changed(ctx)
    url = workspace_url(ctx.app.settings, owner.name, ws.name)
    return LinkCreated(
        **_link_out(link, now).model_dump(), url=f"{url}?{LINK_PARAM}={lid}_{secret}"
    )


@method("share.unlink", right=Right.write, cli=Cli("share-unlink"))
async def share_unlink(ctx: Context, p: LinkRef) -> LinkOut:
    """Revoke a share link at once: it lets no one in from then on (it stays listed)."""
    ws, owner = await _owned(ctx, p.ref, deleting=True)
    link = await ctx.db.get(ShareLink, p.id)
    if link is None or link.workspace_id != ws.id:
        raise NotFound(f"{owner.name}/{ws.name} has no share link {p.id!r}; `den share` lists them")
    if link.revoked_at is None:
        link.revoked_at = datetime.now(UTC)
        await _changed(ctx)
    return _link_out(link, datetime.now(UTC))


# -- ports --------------------------------------------------------------------------------


async def _published(ctx: Context, ws: Workspace) -> list[int]:
    return (await published_ports(ctx.db, [ws.id])).get(ws.id, [])


@method("web.port", right=Right.write, cli=Cli("port"))
async def web_port(ctx: Context, p: PortSet) -> ShareOut:
    """Set the port inside the workspace that its main URL leads to (default 8080)."""
    ws, owner = await _owned(ctx, p.ref)
    if p.port in await _published(ctx, ws):
        raise Conflict(
            f"port {p.port} of {owner.name}/{ws.name} is published with a URL of its own; "
            f"`den unpublish {owner.name}/{ws.name} {p.port}` first"
        )
    if ws.http_port != p.port:
        ws.http_port = p.port
        await _changed(ctx)
    return await _share_out(ctx, ws, owner)


@method("web.publish", right=Right.write, cli=Cli("publish"))
async def web_publish(ctx: Context, p: PortSet) -> ShareOut:
    """Give a further port of the workspace a URL of its own (same sharing as the main URL)."""
    ws, owner = await _owned(ctx, p.ref)
    ref = f"{owner.name}/{ws.name}"
    if p.port == ws.http_port:
        raise Conflict(f"port {p.port} is the one {ref}'s main URL leads to already")
    ports = await _published(ctx, ws)
    if p.port in ports:
        raise Conflict(f"port {p.port} of {ref} is published already")
    if len(ports) >= MAX_PORTS:
        raise InvalidParams(f"a workspace publishes at most {MAX_PORTS} ports", field="port")
    ctx.db.add(PublishedPort(workspace_id=ws.id, port=p.port))
    await _changed(ctx)
    return await _share_out(ctx, ws, owner)


@method("web.unpublish", right=Right.write, cli=Cli("unpublish"))
async def web_unpublish(ctx: Context, p: PortSet) -> ShareOut:
    """Take a published port's URL away (the main URL stays)."""
    ws, owner = await _owned(ctx, p.ref, deleting=True)
    row = await ctx.db.get(PublishedPort, (ws.id, p.port))
    if row is None:
        raise NotFound(
            f"port {p.port} of {owner.name}/{ws.name} is not published; `den share` lists its URLs"
        )
    await ctx.db.delete(row)
    await _changed(ctx)
    return await _share_out(ctx, ws, owner)
