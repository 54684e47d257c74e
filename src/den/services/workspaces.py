"""Workspaces: the lifecycle of an isolated environment owned by one user.

Desired state goes to the database first and is committed before the host is
touched, so that the reconciler can finish or undo any operation a crash
interrupts: ``creating`` rows are undone, ``deleting`` rows are finished.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Awaitable, Callable, Collection, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from den.backends import registry
from den.backends.base import Spec
from den.config import Settings
from den.db.models import BusyLease, Image, PublishedPort, User, Workspace
from den.errors import BackendFailure, Conflict, DenError, InvalidParams, NotFound
from den.log import timed
from den.net import ipam
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services import account, dotfiles
from den.services.common import Name, find_user, release_db, user_or_self
from den.services.dotfiles import DotfilesUrl
from den.services.quotas import (
    apply_disk_limit,
    check_quota,
    check_resources,
    default_disk,
    owner_lock,
    parse_disk,
    parse_mib,
)
from den.web.urls import workspace_url

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App

REF_RE = re.compile(r"(?:([a-z][a-z0-9-]{0,30})/)?([a-z][a-z0-9-]{0,30})")
DEFAULT_NAME = "default"
# The backend_state key of Spec.code_owner, set at create and clone (before the
# first start, which mounts /code with it) and kept ever after; none: 0, as in
# the workspaces made before den had accounts.
CODE_OWNER = "code_owner"


def parse_ref(ref: str) -> tuple[str | None, str]:
    """ "NAME" (yours) or "OWNER/NAME" -> (owner or None, name)."""
    m = REF_RE.fullmatch(ref)
    if not m:
        raise InvalidParams(
            f"{ref[:80]!r} is not a workspace: write NAME or OWNER/NAME (lowercase letters, "
            "digits and '-', starting with a letter)",
            field="ref",
        )
    return m.group(1), m.group(2)


class WorkspaceOut(BaseModel):
    id: str
    ref: str
    owner: str
    name: str
    state: str
    state_reason: str
    image: str
    backend: str
    emulated: bool | None = Field(
        None, description="microvm: its CPU is emulated (TCG, no usable KVM); null: sandbox."
    )
    backend_note: str = Field("", description="What its backend wants you to know (den show).")
    address: str | None
    cpu: float
    memory_mb: int
    pids: int
    disk_mb: int | None
    created_at: datetime
    last_activity_at: datetime | None
    last_activity_kind: str
    dotfiles_url: str = Field("", description="Dotfiles repository, credentials masked.")
    dotfiles_state: str = Field("", description="running, ok or failed ('': none).")
    dotfiles_log: str | None = Field(None, description="Tail of the dotfiles' output (den show).")
    url: str = Field("", description="Its HTTPS URL (proxied to its http_port).")
    urls: list[str] = Field(
        default_factory=list, description="Every URL: the main one, then its published ports'."
    )
    busy_until: datetime | None = Field(
        None, description="Held awake until then by a busy lease (den-busy inside; den show)."
    )


def ws_urls(settings: Settings, ws: Workspace, owner: str, ports: Iterable[int] = ()) -> list[str]:
    """The main URL of a workspace, then those of its published ``ports``."""
    main = workspace_url(settings, owner, ws.name)
    return [main, *(workspace_url(settings, owner, ws.name, p) for p in sorted(ports))]


async def published_ports(db: AsyncSession, ids: Collection[str]) -> dict[str, list[int]]:
    """The published ports of the workspaces ``ids`` (one query), sorted."""
    out: dict[str, list[int]] = {}
    if ids:
        rows = await db.execute(
            select(PublishedPort.workspace_id, PublishedPort.port)
            .where(PublishedPort.workspace_id.in_(list(ids)))
            .order_by(PublishedPort.port)
        )
        for ws_id, port in rows.tuples():
            out.setdefault(ws_id, []).append(port)
    return out


async def ws_out_urls(ctx: Context, ws: Workspace, owner: str) -> WorkspaceOut:
    """ws_out with its URLs, published ports included."""
    ports = (await published_ports(ctx.db, [ws.id])).get(ws.id, [])
    return ws_out(ws, owner, ctx.app.settings, ports)


def ws_out(
    ws: Workspace, owner: str, settings: Settings | None = None, ports: Iterable[int] = ()
) -> WorkspaceOut:
    """A workspace as callers see it; with ``settings``, its URLs too."""
    urls = ws_urls(settings, ws, owner, ports) if settings is not None else []
    return WorkspaceOut(
        id=ws.id,
        ref=f"{owner}/{ws.name}",
        owner=owner,
        name=ws.name,
        state=ws.state,
        state_reason=ws.state_reason,
        image=ws.image,
        backend=ws.backend,
        **accel_of(ws),
        address=ws.address,
        cpu=ws.cpu,
        memory_mb=ws.memory_mb,
        pids=ws.pids,
        disk_mb=ws.disk_mb,
        created_at=ws.created_at,
        last_activity_at=ws.last_activity_at,
        last_activity_kind=ws.last_activity_kind,
        **dotfiles.summary(ws),
        url=urls[0] if urls else "",
        urls=urls,
    )


async def find_workspace(
    ctx: Context, ref: str, *, deleting: bool = False
) -> tuple[Workspace, User]:
    """The workspace a caller names; another user's is "not found" for members.

    One being deleted is refused with its reason, unless ``deleting`` (show, rm).
    """
    owner_name, name = parse_ref(ref)
    if owner_name is None:
        if ctx.caller.user_id is None:
            raise InvalidParams(
                f"{ctx.caller.name} owns no workspaces: write OWNER/NAME", field="ref"
            )
        owner_name = ctx.caller.name
    if not ctx.caller.is_admin and owner_name != ctx.caller.name:
        raise NotFound(f"no workspace {ref!r}")
    q = (
        select(Workspace, User)
        .join(User, Workspace.user_id == User.id)
        .where(User.name == owner_name, Workspace.name == name)
    )
    row = (await ctx.db.execute(q)).first()
    if row is None:
        raise NotFound(f"no workspace {ref!r}; `den ls` lists yours")
    ws, owner = row
    if ctx.caller.scope is not None and ws.id != ctx.caller.scope:
        # A workspace's own token (den.meta) reaches that workspace alone.
        raise NotFound(f"no workspace {ref!r}: a workspace token reaches only its own")
    if ws.state == "deleting" and not deleting:
        why = f": {ws.state_reason}" if ws.state_reason else ""
        raise Conflict(f"workspace {owner.name}/{ws.name} is being deleted{why}")
    return ws, owner


def code_owner_of(ws: Workspace) -> int:
    """Its Spec.code_owner: the uid inside that owns what is root's on disk in /code."""
    return int((ws.backend_state or {}).get(CODE_OWNER, 0))


def spec_of(app: App, ws: Workspace, owner: User) -> Spec:
    if owner.subuid_start is None or owner.subuid_count is None:
        raise BackendFailure(f"{owner.name} has no subordinate id range; recreate the user")
    vdir = app.pool.volume_dir(ws.id)
    return Spec(
        id=ws.id,
        owner=owner.name,
        name=ws.name,
        image=ws.image,
        rootfs=vdir / "rootfs",
        code=vdir / "code",
        uid_start=owner.subuid_start,
        uid_count=owner.subuid_count,
        cpu=ws.cpu,
        memory_mb=ws.memory_mb,
        pids=ws.pids,
        address=ws.address or "",
        hostname=ws.name,
        code_owner=code_owner_of(ws),
        backend=ws.backend,
    )


async def live_workspaces(db: AsyncSession) -> list[tuple[Workspace, User]]:
    """Every running or suspended workspace with its owner."""
    rows = await db.execute(
        select(Workspace, User)
        .join(User, Workspace.user_id == User.id)
        .where(Workspace.state.in_(("running", "suspended")))
    )
    return [(ws, owner) for ws, owner in rows.all()]


async def workspace_by_id(db: AsyncSession, ws_id: str) -> tuple[Workspace, User] | None:
    """The workspace with id ``ws_id`` and its owner, if it exists."""
    row = (
        await db.execute(
            select(Workspace, User)
            .join(User, Workspace.user_id == User.id)
            .where(Workspace.id == ws_id)
        )
    ).first()
    return None if row is None else (row[0], row[1])


def new_id() -> str:
    return secrets.token_hex(6)


# -- backends (den.services.vm too) ---------------------------------------------

TCG_NOTE = (
    "emulated: this host has no usable KVM, so the VM's CPU is emulated (TCG), many "
    "times slower than the host's"
)


def backend_names(settings: Settings | None = None) -> list[str]:
    """The backends den has; with ``settings``, those that can start workspaces on
    this node (enabled, their host parts in place)."""
    return [
        n for n in registry.names() if settings is None or registry.unavailable(n, settings) is None
    ]


def check_backend(name: str, settings: Settings, *, given: bool) -> str:
    """``name`` when workspaces can be created on it here; else InvalidParams saying what to do."""
    have = backend_names()
    why = registry.unavailable(name, settings) if name in have else None
    if why is not None:
        source = "" if given else " (the default_backend setting)"
        raise InvalidParams(
            f"backend {name!r}{source} cannot start workspaces on this node: {why}; "
            "or use --backend sandbox",
            field="backend",
        )
    if name not in have:
        source = "" if given else " (the default_backend setting)"
        raise InvalidParams(
            f"backend {name!r}{source} is not enabled on this node (it has: {', '.join(have)}); "
            "use --backend sandbox, or ask an admin to enable it (`den init` prepares microvm)",
            field="backend",
        )
    return name


def accel_of(ws: Workspace) -> dict[str, Any]:
    """``emulated`` and its note for a microVM (its backend_state "accel", set when it starts)."""
    accel = (ws.backend_state or {}).get("accel")
    if ws.backend != "microvm" or accel is None:
        return {}
    notes = [TCG_NOTE] if accel == "tcg" else []
    restart = (ws.backend_state or {}).get("restart_needed")
    if isinstance(restart, str) and restart:
        # a resize the running VM cannot take live (its memory, its vCPUs)
        notes.append(f"restart needed: {restart[:200]}")
    return {"emulated": accel == "tcg", "backend_note": "; ".join(notes)}


# -- params --------------------------------------------------------------------


class WsRef(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME (yours) or OWNER/NAME.")


class WsCreate(Params):
    name: Annotated[Name, CliArg()] = Field(description="Workspace name, unique per owner.")
    user: Name | None = Field(None, description="Owner (default: you; others: admins only).")
    image: Name | None = Field(
        None, description="Image to start from (default: the configured one)."
    )
    cpu: float | None = Field(None, description="CPUs, e.g. 0.5 or 2.")
    mem: str | None = Field(None, max_length=16, description="Memory, e.g. 512M or 2G.")
    pids: int | None = Field(None, description="Most processes at once.")
    disk: str | None = Field(
        None, max_length=16, description="Disk limit, e.g. 10G (default: default_disk)."
    )
    dotfiles: DotfilesUrl | None = Field(
        None, description="Dotfiles repository to install (default: the owner's; '': none)."
    )
    backend: Literal["sandbox", "microvm"] | None = Field(
        None,
        description="sandbox (namespaces) or microvm (its own kernel) (default: default_backend).",
    )


class WsResize(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    cpu: float | None = Field(None, description="New CPUs.")
    mem: str | None = Field(None, max_length=16, description="New memory, e.g. 2G.")
    pids: int | None = Field(None, description="New process limit.")
    disk: str | None = Field(None, max_length=16, description="New disk limit (disk_quota = true).")


class WsList(Params):
    all: bool = Field(False, description="Every user's workspaces (admins).")
    user: Name | None = Field(None, description="Only this owner's workspaces (admins).")


class WsRename(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    new_name: Annotated[Name, CliArg()] = Field(description="The new name.")


class WsClone(Params):
    source: Annotated[str, CliArg()] = Field(max_length=80, description="Workspace to copy.")
    name: Annotated[Name, CliArg()] = Field(description="Name of the copy (yours).")


class Deleted(BaseModel):
    deleted: str


# -- helpers ------------------------------------------------------------------


async def _allocate_address(ctx: Context) -> str:
    taken = (
        await ctx.db.execute(select(Workspace.address).where(Workspace.address.is_not(None)))
    ).scalars()
    return ipam.allocate(ctx.app.settings.network_subnet, [a for a in taken if a])


async def _image_ready(ctx: Context, name: str) -> None:
    img = (await ctx.db.execute(select(Image).where(Image.name == name))).scalar_one_or_none()
    if img is None or img.state != "ready" or not ctx.app.pool.image_path(name).exists():
        raise NotFound(f"no image {name!r} is ready; `den image ls` lists images")


async def materialize(
    ctx: Context, ws: Workspace, owner: User, make_storage: Callable[[], Awaitable[None]]
) -> None:
    """Make a committed ``creating`` row real; on failure undo everything and re-raise."""
    spec = spec_of(ctx.app, ws, owner)
    backend = ctx.app.backend_for(spec)
    try:
        with timed("storage", ws=ws.id):
            await make_storage()
        state = await backend.create(spec)
        state = await backend.start(spec, state)
    except BaseException:
        await undo_create(ctx, ws, owner)
        raise
    ws.backend_state = {**(ws.backend_state or {}), **state}  # CODE_OWNER kept
    ws.state = "running"
    ws.last_activity_at = datetime.now(UTC)
    ws.last_activity_kind = "create"
    await ctx.db.commit()


async def undo_create(ctx: Context, ws: Workspace, owner: User) -> None:
    spec = spec_of(ctx.app, ws, owner)
    try:
        await ctx.app.backend_for(spec).delete(spec, dict(ws.backend_state or {}))
    finally:
        await ctx.app.pool.delete_volume(ws.id)
        await ctx.db.rollback()
        row = await ctx.db.get(Workspace, ws.id)
        if row is not None:
            await ctx.db.delete(row)
        await ctx.db.commit()
        await maybe_teardown_network(ctx)


async def maybe_teardown_network(ctx: Context) -> None:
    """Undo the instance's host network changes when no workspace is left."""
    left = (await ctx.db.execute(select(func.count(Workspace.id)))).scalar_one()
    await release_db(ctx)
    if left == 0:
        await ctx.app.teardown_host()


async def insert_row(ctx: Context, ws: Workspace, *keep: object) -> None:
    """Insert a ``creating`` row with a fresh address and commit it (desired state first).

    ``keep``: rows the caller goes on reading (its owner, a source): a rollback
    expires every row of the session, and an expired attribute read later outside
    an await would fail, so they are loaded again after one."""
    for _attempt in range(5):
        ws.address = await _allocate_address(ctx)
        ctx.db.add(ws)
        try:
            await ctx.db.commit()
            return
        except IntegrityError as exc:
            await ctx.db.rollback()
            if "address" not in str(exc.orig):
                raise Conflict(f"a workspace named {ws.name!r} exists already") from None
            # Another create took the same address between our read and our commit.
            for row in keep:
                await ctx.db.refresh(row)
    raise Conflict("could not allocate an address; try again")


async def _name_free(ctx: Context, owner: User, name: str) -> None:
    dup = await ctx.db.execute(
        select(Workspace.state).where(Workspace.user_id == owner.id, Workspace.name == name)
    )
    row = dup.first()
    if row is not None:
        being = " (it is being deleted)" if row[0] == "deleting" else ""
        raise Conflict(f"{owner.name} has a workspace named {name!r} already{being}")


@method("workspace.create", right=Right.write, cli=Cli("new"))
async def workspace_create(ctx: Context, p: WsCreate) -> WorkspaceOut:
    """Create a workspace from an image and start it; returns once it can run exec."""
    s = ctx.app.settings
    owner = await user_or_self(ctx, p.user)
    if owner.id != ctx.caller.user_id:
        ctx.require_admin("create a workspace for another user")
    ctx.target = f"workspace:{owner.name}/{p.name}"
    backend = check_backend(p.backend or s.default_backend, s, given=p.backend is not None)
    image = p.image or s.default_image
    cpu = p.cpu if p.cpu is not None else s.default_cpu
    memory_mb = parse_mib(p.mem, "mem") if p.mem else parse_mib(s.default_memory, "mem")
    pids = p.pids if p.pids is not None else s.default_pids
    check_resources(cpu, memory_mb, pids)
    disk_mb = parse_disk(ctx, p.disk if p.disk is not None else default_disk(ctx))
    await _image_ready(ctx, image)
    # /code is the owner's account's when sessions land there (ssh_user unset)
    # and the image can hold it; else root's, as before den made accounts.
    holds = not s.ssh_user and await asyncio.to_thread(
        account.can_hold_account, ctx.app.pool.image_path(image), owner.name
    )
    ws = Workspace(
        id=new_id(),
        user_id=owner.id,
        name=p.name,
        image=image,
        backend=backend,
        state="creating",
        cpu=cpu,
        memory_mb=memory_mb,
        pids=pids,
        disk_mb=disk_mb,
        backend_state={CODE_OWNER: account.UID} if holds else {},
        http_port=s.web_default_port,
    )
    async with owner_lock(ctx, owner):
        await _name_free(ctx, owner, p.name)
        await check_quota(ctx, owner, cpu, memory_mb, disk_mb, pids=pids)
        await insert_row(ctx, ws, owner)
    pool = ctx.app.pool

    written = False

    async def storage() -> None:
        nonlocal written
        rootfs = await pool.snapshot(pool.image_path(image), ws.id, "rootfs")
        if holds:  # the owner's own user, into the untouched image tree
            written = await account.write_at_create(ctx, rootfs, owner)
        await pool.snapshot(pool.code, ws.id, "code")
        await apply_disk_limit(ctx, ws)

    await materialize(ctx, ws, owner, storage)
    if not written:
        await account.setup_owner(ctx, ws, owner)  # the owner's own user, made inside
    await dotfiles.start_at_create(ctx, ws, owner, p.dotfiles)  # in the background
    ctx.app.web_changed()  # its label is known now (the gate may have cached "no such host")
    return ws_out(ws, owner.name, s)


@method(
    "workspace.list",
    right=Right.read,
    cli=Cli(
        "ls",
        columns=(
            "ref",
            "state",
            "address",
            "image",
            "cpu",
            "memory_mb",
            "created_at",
            "url",
            "state_reason",
        ),
    ),
)
async def workspace_list(ctx: Context, p: WsList) -> list[WorkspaceOut]:
    """List workspaces: yours, or (admins) a user's or everyone's with --all."""
    q = select(Workspace, User.name).join(User, Workspace.user_id == User.id)
    if p.user is not None:
        owner = await find_user(ctx, p.user)
        q = q.where(Workspace.user_id == owner.id)
    elif not (p.all and ctx.caller.is_admin):
        if ctx.caller.user_id is None:
            if not ctx.caller.is_admin:
                return []
        else:
            q = q.where(Workspace.user_id == ctx.caller.user_id)
    rows = (await ctx.db.execute(q.order_by(User.name, Workspace.name))).all()
    ports = await published_ports(ctx.db, [ws.id for ws, _ in rows])
    return [ws_out(ws, owner, ctx.app.settings, ports.get(ws.id, ())) for ws, owner in rows]


@method("workspace.get", right=Right.read, cli=Cli("show"))
async def workspace_get(ctx: Context, p: WsRef) -> WorkspaceOut:
    """Show one workspace: state, address, image, resources, activity."""
    ws, owner = await find_workspace(ctx, p.ref, deleting=True)
    out = await ws_out_urls(ctx, ws, owner.name)
    out.dotfiles_log = dotfiles.log_of(ws, out.ref) if ws.dotfiles_state else None
    lease = await ctx.db.get(BusyLease, ws.id)
    if lease is not None and lease.until > datetime.now(UTC):
        out.busy_until = lease.until  # the reason it stays awake
    return out


@method("workspace.rename", right=Right.write, cli=Cli("rename"))
async def workspace_rename(ctx: Context, p: WsRename) -> WorkspaceOut:
    """Give a workspace a new name (unique among its owner's)."""
    ws, owner = await find_workspace(ctx, p.ref)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    if p.new_name == ws.name:
        return await ws_out_urls(ctx, ws, owner.name)
    dup = await ctx.db.execute(
        select(Workspace.id).where(Workspace.user_id == owner.id, Workspace.name == p.new_name)
    )
    if dup.first() is not None:
        raise Conflict(f"{owner.name} has a workspace named {p.new_name!r} already")
    ws.name = p.new_name
    await ctx.db.commit()
    ctx.app.web_changed()  # its URLs are new ones, the old ones lead nowhere
    return await ws_out_urls(ctx, ws, owner.name)


@method("workspace.resize", right=Right.write, cli=Cli("resize"))
async def workspace_resize(ctx: Context, p: WsResize) -> WorkspaceOut:
    """Change a workspace's CPUs, memory, process or disk limit; live when it runs."""
    ws, owner = await find_workspace(ctx, p.ref)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    cpu = p.cpu if p.cpu is not None else ws.cpu
    memory_mb = parse_mib(p.mem, "mem") if p.mem else ws.memory_mb
    pids = p.pids if p.pids is not None else ws.pids
    disk_mb = parse_disk(ctx, p.disk) if p.disk else ws.disk_mb
    check_resources(cpu, memory_mb, pids)
    before = ws.cpu, ws.memory_mb, ws.pids, ws.disk_mb
    async with owner_lock(ctx, owner):
        await check_quota(ctx, owner, cpu, memory_mb, disk_mb, exclude=ws.id, pids=pids)
        ws.cpu, ws.memory_mb, ws.pids, ws.disk_mb = cpu, memory_mb, pids, disk_mb
        await ctx.db.commit()  # the new sizes count for the owner's next quota check
    async with ctx.app.ws_lock(ws.id):
        spec = spec_of(ctx.app, ws, owner)
        try:
            ws.backend_state = await ctx.app.backend_for(spec).update_resources(
                spec, dict(ws.backend_state or {})
            )
            await apply_disk_limit(ctx, ws)
        except BaseException:
            ws.cpu, ws.memory_mb, ws.pids, ws.disk_mb = before
            await ctx.db.commit()
            raise
    return await ws_out_urls(ctx, ws, owner.name)


@method("workspace.clone", right=Right.write, cli=Cli("cp"))
async def workspace_clone(ctx: Context, p: WsClone) -> WorkspaceOut:
    """Copy a workspace's files into a new workspace of yours (O(1): a snapshot)."""
    src, src_owner = await find_workspace(ctx, p.source)
    owner = await user_or_self(ctx, None) if ctx.caller.user_id is not None else src_owner
    ctx.target = f"workspace:{owner.name}/{p.name}"
    code_owner = code_owner_of(src)
    ws = Workspace(
        id=new_id(),
        user_id=owner.id,
        name=p.name,
        image=src.image,
        backend=src.backend,
        state="creating",
        cpu=src.cpu,
        memory_mb=src.memory_mb,
        pids=src.pids,
        # A source from before disk limits were on has none; its copy gets the default.
        disk_mb=src.disk_mb if src.disk_mb is not None else parse_disk(ctx, default_disk(ctx)),
        # The copy's files were written through the source's /code view: the same map.
        backend_state={CODE_OWNER: code_owner} if code_owner else {},
        http_port=src.http_port,  # the same app listens on the same port; sharing is not copied
    )
    src_id = src.id
    async with owner_lock(ctx, owner):
        await _name_free(ctx, owner, p.name)
        await check_quota(ctx, owner, src.cpu, src.memory_mb, src.disk_mb, pids=src.pids)
        await insert_row(ctx, ws, owner, src)
    pool = ctx.app.pool

    async def storage() -> None:
        await pool.clone(src_id, "rootfs", ws.id)
        await pool.clone(src_id, "code", ws.id)
        await apply_disk_limit(ctx, ws)

    await materialize(ctx, ws, owner, storage)
    # The source's account becomes the new owner's (renamed when it was another user's).
    await account.setup_owner(ctx, ws, owner)
    ctx.app.web_changed()
    return ws_out(ws, owner.name, ctx.app.settings)


def failure_reason(exc: BaseException) -> str:
    """What made a host operation fail, for a workspace's state_reason."""
    text = exc.message if isinstance(exc, DenError) else f"{type(exc).__name__}: {exc}"
    return text[:500]


async def remove_from_host(app: App, ws: Workspace, owner: User) -> None:
    """Tear a workspace down and remove its storage; done parts are skipped on a retry."""
    spec = spec_of(app, ws, owner)
    await app.backend_for(spec).delete(spec, dict(ws.backend_state or {}))
    await app.pool.delete_volume(ws.id)


async def delete_workspace(ctx: Context, ws: Workspace, owner: User) -> None:
    """Mark, tear down, remove storage, drop the row (each step survives a crash).

    When the host refuses, the row stays ``deleting`` with the reason, shown by
    ls and show; the reconciler tries again on each pass (and so does ``rm``).
    """
    async with ctx.app.ws_lock(ws.id):
        ws.state = "deleting"
        ws.state_reason = ""
        # Its verified custom domains stay its owner's a while (no import
        # cycle: domains uses this module).
        from den.services.domains import hold_workspace_domains

        await hold_workspace_domains(ctx.db, ws)
        await ctx.db.commit()
        try:
            await remove_from_host(ctx.app, ws, owner)
        except Exception as exc:
            ws.state_reason = failure_reason(exc)
            await ctx.db.commit()
            raise BackendFailure(
                f"could not delete {owner.name}/{ws.name}: {ws.state_reason}. It stays listed "
                "as deleting; den tries again on every reconciler pass"
            ) from exc
        await ctx.db.delete(ws)
        await ctx.db.commit()
    # Its address may go to another workspace next: nothing cached may lead there.
    ctx.app.web_changed()
    ctx.app.ws_locks.pop(ws.id, None)
    await maybe_teardown_network(ctx)


@method(
    "workspace.delete",
    right=Right.write,
    cli=Cli("rm", confirm="Delete workspace {ref} and its files?"),
)
async def workspace_delete(ctx: Context, p: WsRef) -> Deleted:
    """Delete a workspace: processes, snapshot, cgroup, network and address all go."""
    ws, owner = await find_workspace(ctx, p.ref, deleting=True)
    ref = f"{owner.name}/{ws.name}"
    ctx.target = f"workspace:{ref}"
    await delete_workspace(ctx, ws, owner)
    return Deleted(deleted=ref)
