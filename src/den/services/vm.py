"""The compute manager's ``vm.*`` calls (and ``info``, ``health``) as thin aliases
over workspaces, in its own data model, so a client written for it works
unchanged against den.

Each alias finds the workspace by its id (the compute manager's ``vm_id``) and
calls the workspace method's own function: quotas, locks and host work are
theirs; rights and the audit log are the registry's, under the ``vm.*`` name.
"""

from __future__ import annotations

import ipaddress
import math
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator
from sqlalchemy import select

from den import __version__
from den.config import Settings
from den.db.models import User, Workspace
from den.errors import InvalidParams, NotFound
from den.net import names
from den.rpc.registry import (
    Cli,
    CliArg,
    Context,
    NoParams,
    Params,
    Right,
    method,
    validation_errors,
)
from den.services.common import Name
from den.services.metrics import MetricsQuery, Point, workspace_metrics
from den.services.power import workspace_restart, workspace_start, workspace_stop
from den.services.system import Health, health
from den.services.workspaces import (
    WsCreate,
    WsRef,
    backend_names,
    workspace_by_id,
    workspace_create,
    workspace_delete,
)

VmState = Literal["created", "running", "stopped", "failed"]

# den's states in the compute manager's vocabulary: it has no "suspended" (its
# "stopped" is "stopped / suspended"), and a workspace still being made has not
# started ("created"); one being deleted is on its way out ("stopped").
STATES: dict[str, VmState] = {
    "creating": "created",
    "running": "running",
    "suspended": "stopped",
    "stopped": "stopped",
    "failed": "failed",
    "deleting": "stopped",
}

ID_RE = r"^[0-9a-f]{12}$"


class VmResources(BaseModel):
    cpu_count: int = Field(description="CPUs, rounded up (den allows fractions, e.g. 0.5).")
    memory_mb: int
    disk_gb: int = Field(description="Disk limit in GiB, rounded up (0: no limit).")


class Vm(BaseModel):
    """The compute manager's VM, field for field."""

    id: str = Field(description="The workspace's id.")
    name: str = Field(description="The workspace's name (unique per owner).")
    state: VmState
    image: str
    resources: VmResources
    mycelium_ip: str | None = Field(
        None, description="Always null: den gives workspaces no overlay address of their own."
    )
    tap_device: str | None = Field(
        description="The host-side interface on den's bridge: a microvm's TAP, a sandbox's "
        "veth (host end of its network namespace)."
    )
    ip_address: str | None = Field(description="ADDRESS/PREFIX on den's workspace subnet.")
    created_at: str = Field(description="RFC 3339, UTC, to the second.")
    started_at: str | None = Field(description="When it last went to running.")
    stopped_at: str | None = Field(
        description="When it last stopped, was suspended or failed (null while it runs)."
    )


def _when(at: datetime | None) -> str | None:
    return None if at is None else at.strftime("%Y-%m-%dT%H:%M:%SZ")


def tap_device(settings: Settings, ws: Workspace) -> str | None:
    """The host end of a workspace's network on den's bridge."""
    if ws.backend == "sandbox":
        return names.veth(settings.instance, ws.id)
    tap = (ws.backend_state or {}).get("tap")
    return tap if isinstance(tap, str) else None


def vm_of(settings: Settings, ws: Workspace) -> Vm:
    """A workspace as the compute manager's VM."""
    prefix = ipaddress.ip_network(settings.network_subnet, strict=False).prefixlen
    return Vm(
        id=ws.id,
        name=ws.name,
        state=STATES.get(ws.state, "failed"),
        image=ws.image,
        resources=VmResources(
            cpu_count=max(1, math.ceil(ws.cpu)),
            memory_mb=ws.memory_mb,
            disk_gb=math.ceil(ws.disk_mb / 1024) if ws.disk_mb else 0,
        ),
        tap_device=tap_device(settings, ws),
        ip_address=f"{ws.address}/{prefix}" if ws.address else None,
        created_at=_when(ws.created_at) or "",
        started_at=_when(ws.started_at),
        stopped_at=_when(ws.stopped_at),
    )


async def find_vm(ctx: Context, vm_id: str) -> tuple[Workspace, User]:
    """The caller's workspace with id ``vm_id`` (any, for admins); another user's
    is "not found" and its name never shown."""
    row = await workspace_by_id(ctx.db, vm_id)
    if row is None or (not ctx.caller.is_admin and row[1].id != ctx.caller.user_id):
        raise NotFound(f"no VM {vm_id!r}; vm.list lists yours")
    return row


async def _reload(ctx: Context, ws: Workspace) -> Vm:
    await ctx.db.refresh(ws)
    return vm_of(ctx.app.settings, ws)


def _ref(ws: Workspace, owner: User) -> WsRef:
    return WsRef(ref=f"{owner.name}/{ws.name}")


# -- params -------------------------------------------------------------------


class VmRef(Params):
    vm_id: Annotated[str, CliArg()] = Field(
        pattern=ID_RE, description="The VM's id (a workspace id: `den show` prints it)."
    )


class VmResourcesIn(Params):
    cpu_count: int | None = Field(None, ge=1, le=1024)
    memory_mb: int | None = Field(None, ge=1, le=1 << 24)
    disk_gb: int | None = Field(None, ge=1, le=1 << 20)


class VmCreate(Params):
    name: Annotated[Name, CliArg()] = Field(description="The VM's name (a workspace name).")
    image: Name | None = Field(None, description="Image (default: the configured one).")
    cpu_count: int | None = Field(None, ge=1, le=1024, description="CPUs.")
    memory_mb: int | None = Field(None, ge=1, le=1 << 24, description="Memory in MiB.")
    disk_gb: int | None = Field(None, ge=1, le=1 << 20, description="Disk limit in GiB.")
    resources: VmResourcesIn | None = Field(
        None, description="The same three sizes as the VM model nests them (either form)."
    )
    user: Name | None = Field(None, description="Owner (default: you; others: admins only).")
    backend: Literal["sandbox", "microvm"] | None = Field(
        None, description="den's backend (default: default_backend)."
    )

    @model_validator(mode="after")
    def _one_form(self) -> VmCreate:
        if self.resources is not None:
            for key in ("cpu_count", "memory_mb", "disk_gb"):
                nested = getattr(self.resources, key)
                if nested is not None and getattr(self, key) not in (None, nested):
                    raise ValueError(f"{key} given twice with different values")
                if nested is not None:
                    setattr(self, key, nested)
        return self


class VmMetricsQuery(Params):
    vm_id: Annotated[str, CliArg()] = Field(pattern=ID_RE, description="The VM's id.")
    since: str = Field("1h", max_length=64, description="From when: 15m, 2h or ISO 8601.")
    step: int = Field(0, ge=0, le=86400, description="Seconds per point (0: every sample).")


class VmDeleted(BaseModel):
    id: str
    deleted: bool


class Info(BaseModel):
    name: str
    version: str
    instance: int
    uptime_s: float
    backends: list[str] = Field(description="Backends a workspace may be created on here.")
    default_backend: str


# -- methods ------------------------------------------------------------------


@method("vm.list", right=Right.read, cli=Cli("vm list", columns=("id", "name", "state", "image")))
async def vm_list(ctx: Context, p: NoParams) -> list[Vm]:
    """List VMs: yours; an admin's call lists everyone's (workspace.list --all)."""
    q = select(Workspace).join(User, Workspace.user_id == User.id)
    if not ctx.caller.is_admin:
        if ctx.caller.user_id is None:
            return []
        q = q.where(Workspace.user_id == ctx.caller.user_id)
    rows = (await ctx.db.execute(q.order_by(User.name, Workspace.name))).scalars()
    return [vm_of(ctx.app.settings, ws) for ws in rows]


@method("vm.get", right=Right.read, cli=Cli("vm get"))
async def vm_get(ctx: Context, p: VmRef) -> Vm:
    """Show one VM by id (workspace.get)."""
    ws, _ = await find_vm(ctx, p.vm_id)
    return vm_of(ctx.app.settings, ws)


@method("vm.create", right=Right.write, cli=Cli("vm create"))
async def vm_create(ctx: Context, p: VmCreate) -> Vm:
    """Create a VM and start it (workspace.create): it comes back running."""
    try:
        req = WsCreate(
            name=p.name,
            user=p.user,
            image=p.image,
            cpu=p.cpu_count,
            mem=f"{p.memory_mb}M" if p.memory_mb is not None else None,
            disk=f"{p.disk_gb}G" if p.disk_gb is not None else None,
            backend=p.backend,
        )
    except ValidationError as exc:
        raise InvalidParams(validation_errors(exc)) from None
    out = await workspace_create(ctx, req)
    ws = await ctx.db.get(Workspace, out.id)
    if ws is None:  # deleted meanwhile by another call
        raise NotFound(f"VM {out.id!r} was deleted while it was made")
    return await _reload(ctx, ws)


@method("vm.start", right=Right.write, cli=Cli("vm start"))
async def vm_start(ctx: Context, p: VmRef) -> Vm:
    """Start a stopped VM, or resume a suspended one (workspace.start)."""
    ws, owner = await find_vm(ctx, p.vm_id)
    await workspace_start(ctx, _ref(ws, owner))
    return await _reload(ctx, ws)


@method("vm.stop", right=Right.write, cli=Cli("vm stop"))
async def vm_stop(ctx: Context, p: VmRef) -> Vm:
    """Stop a VM; its files and address are kept (workspace.stop)."""
    ws, owner = await find_vm(ctx, p.vm_id)
    await workspace_stop(ctx, _ref(ws, owner))
    return await _reload(ctx, ws)


@method("vm.restart", right=Right.write, cli=Cli("vm restart"))
async def vm_restart(ctx: Context, p: VmRef) -> Vm:
    """Stop a VM if it runs, then start it (workspace.restart)."""
    ws, owner = await find_vm(ctx, p.vm_id)
    await workspace_restart(ctx, _ref(ws, owner))
    return await _reload(ctx, ws)


@method("vm.delete", right=Right.write, cli=Cli("vm delete", confirm="Delete VM {vm_id}?"))
async def vm_delete(ctx: Context, p: VmRef) -> VmDeleted:
    """Delete a VM and its files (workspace.delete)."""
    ws, owner = await find_vm(ctx, p.vm_id)
    await workspace_delete(ctx, _ref(ws, owner))
    return VmDeleted(id=p.vm_id, deleted=True)


@method(
    "vm.metrics.query",
    right=Right.read,
    cli=Cli("vm metrics", columns=("at", "cpu_cores", "memory_bytes", "pids")),
)
async def vm_metrics_query(ctx: Context, p: VmMetricsQuery) -> list[Point]:
    """A VM's resource use over time (workspace.metrics)."""
    ws, owner = await find_vm(ctx, p.vm_id)
    q = MetricsQuery(ref=f"{owner.name}/{ws.name}", since=p.since, step=p.step)
    return await workspace_metrics(ctx, q)


@method("info", right=Right.public, cli=Cli("vm info"))
async def info(ctx: Context, p: NoParams) -> Info:
    """Server info, as the compute manager's ``info``: version and backends."""
    h = await health(ctx, p)
    s = ctx.app.settings
    return Info(
        name="den",
        version=__version__,
        instance=h.instance,
        uptime_s=h.uptime_s,
        backends=backend_names(s),
        default_backend=s.default_backend,
    )


@method("health", right=Right.public, cli=Cli("vm health"))
async def vm_health(ctx: Context, p: NoParams) -> Health:
    """Health check, as the compute manager's ``health`` (rpc.health)."""
    return await health(ctx, p)
