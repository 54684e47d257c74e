"""net.*: the node's networking over den's one registry (read, write, admin).

Reads ask the kernel (netlink through pyroute2, nftables' JSON API, /proc);
writes change it and record what they made (den.db.models.NodeNetObject),
which :func:`restore` puts back when den starts. What den itself or the host's
connectivity depends on is refused (den.node.net_state). The work lives in
den.node.net_*; this module registers the methods.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from den.db.models import AuditEvent, NodeNetObject
from den.errors import BackendFailure, Conflict, InvalidParams, NotFound
from den.net import firewall as den_firewall
from den.node import net_kernel, net_nft, net_state
from den.node.net_params import (
    BridgeAdd,
    BridgeConnect,
    BridgePort,
    BridgeQuery,
    ConntrackFlush,
    ConntrackQuery,
    DnatAdd,
    FamilyQuery,
    FirewallQuery,
    IdParam,
    InterfacesQuery,
    NameParam,
    RouteSpec,
    RoutesQuery,
    RuleAdd,
    SnatAdd,
    TapCreate,
)
from den.rpc.registry import Cli, Context, NoParams, Right, method

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
Json = dict[str, Any]
T = TypeVar("T")
# One writer at a time: a change reads the records, touches the kernel, records.
_LOCK = asyncio.Lock()


async def _thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def _instance(ctx: Context) -> int:
    return int(ctx.app.settings.instance)


def _subnet(ctx: Context) -> str:
    return str(ctx.app.settings.network_subnet)


def den_ports(app: App) -> set[int]:
    """The ports den listens on (as configured, and as bound when configured 0)."""
    s = app.settings
    ports = {s.ssh_port, s.http_port, s.mail_port, *app.network.ports}
    if s.web:
        ports.add(s.web_port)
    return ports - {0}


async def _records(db: AsyncSession, kinds: tuple[str, ...] | None = None) -> list[NodeNetObject]:
    q = select(NodeNetObject).order_by(NodeNetObject.id)
    if kinds is not None:
        q = q.where(NodeNetObject.kind.in_(kinds))
    return list((await db.execute(q)).scalars())


async def _find(db: AsyncSession, key: str) -> NodeNetObject | None:
    return (
        await db.execute(select(NodeNetObject).where(NodeNetObject.key == key))
    ).scalar_one_or_none()


def _view(r: NodeNetObject) -> Json:
    return {
        "id": r.id,
        "kind": r.kind,
        "spec": r.spec,
        "created_by": r.created_by,
        "created_at": r.created_at.isoformat(),
    }


async def _record(ctx: Context, kind: str, spec: Json) -> NodeNetObject:
    row = NodeNetObject(
        kind=kind, key=net_state.key(kind, spec), spec=spec, created_by=ctx.caller.name
    )
    ctx.db.add(row)
    await ctx.db.flush()
    return row


async def _forget(ctx: Context, key: str) -> None:
    row = await _find(ctx.db, key)
    if row is not None:
        await ctx.db.delete(row)
        await ctx.db.flush()


async def _apply_nft(ctx: Context) -> None:
    rows = await _records(ctx.db, net_state.NFT_KINDS)
    await _thread(net_nft.apply, _instance(ctx), [(r.id, r.kind, r.spec) for r in rows])


# -- reads ---------------------------------------------------------------------------


@method("net.status", right=Right.read, cli=Cli("net status"))
async def status(ctx: Context, p: NoParams) -> Json:
    """Overview: den's pid and uptime, the node's addresses, default route, managed objects."""
    links = await _thread(net_kernel.interfaces)
    devs = await _thread(net_kernel.default_route_devs)
    sysctl = await _thread(net_kernel.sysctl)
    counts: dict[str, int] = {}
    for r in await _records(ctx.db):
        counts[r.kind] = counts.get(r.kind, 0) + 1
    return {
        "pid": os.getpid(),
        "uptime_s": round((datetime.now(UTC) - ctx.app.started_at).total_seconds(), 1),
        "instance": _instance(ctx),
        "hostname": socket.gethostname(),
        "mode": "native",
        "interfaces": len(links),
        "up": sum(1 for i in links if i["up"]),
        "addresses": [
            {"dev": i["name"], **a}
            for i in links
            for a in i["addresses"]
            if a["scope"] == 0 and i["kind"] != "loopback"
        ],
        "default_route_devs": sorted(devs),
        "ip_forward": sysctl["ip_forward"],
        "managed": counts,
    }


@method("net.interfaces", right=Right.read, cli=Cli("net interfaces"))
async def interfaces(ctx: Context, p: InterfacesQuery) -> list[Json]:
    """Interfaces with their addresses, state, MTU, MAC and bridge (master)."""
    return await _thread(net_kernel.interfaces, p.name)


@method("net.routes", right=Right.read, cli=Cli("net route ls"))
async def routes(ctx: Context, p: RoutesQuery) -> list[Json]:
    """The kernel's routes of one table (default main)."""
    return await _thread(net_kernel.routes, p.family, p.table)


@method("net.neighbors", right=Right.read, cli=Cli("net neighbors"))
async def neighbors(ctx: Context, p: FamilyQuery) -> list[Json]:
    """The ARP/NDP neighbour table."""
    return await _thread(net_kernel.neighbors, p.family)


@method("net.bridge", right=Right.read, cli=Cli("net bridge ls"))
async def bridge(ctx: Context, p: BridgeQuery) -> list[Json]:
    """Bridges with their ports, state and STP."""
    return await _thread(net_kernel.bridges, p.name)


@method("net.firewall", right=Right.read, cli=Cli("net fw ls"))
async def firewall(ctx: Context, p: FirewallQuery) -> Json:
    """nftables: tables, chains and rules (as nft's JSON lists them), den's node table named."""
    items = await _thread(net_nft.ruleset)
    return {
        "node_table": f"{net_nft.FAMILY} {net_nft.table_name(_instance(ctx))}",
        "tables": net_nft.tables_view(items, p.family, p.table),
    }


@method("net.dns", right=Right.read, cli=Cli("net dns"))
async def dns(ctx: Context, p: NoParams) -> Json:
    """Nameservers, search domains and options (from /etc/resolv.conf)."""
    return await _thread(net_kernel.dns)


@method("net.sysctl", right=Right.read, cli=Cli("net sysctl"))
async def sysctl(ctx: Context, p: NoParams) -> Json:
    """Forwarding, proxy_arp and proxy_ndp, globally and per interface."""
    return await _thread(net_kernel.sysctl)


@method("net.conntrack", right=Right.read, cli=Cli("net conntrack ls"))
async def conntrack(ctx: Context, p: ConntrackQuery) -> Json:
    """Connection tracking entries (optionally of one zone), at most ``limit``."""
    return await _thread(net_kernel.conntrack, p.zone, p.limit)


@method("net.conntrack.stats", right=Right.read, cli=Cli("net conntrack stats"))
async def conntrack_stats(ctx: Context, p: NoParams) -> Json:
    """Connection tracking: entry count, limit and per-CPU statistics."""
    return await _thread(net_kernel.conntrack_stats)


async def _nft_view(ctx: Context, kinds: tuple[str, ...]) -> list[Json]:
    rules = await _thread(net_nft.present, _instance(ctx))
    out = []
    for r in await _records(ctx.db, kinds):
        rule = (rules or {}).get(net_nft.comment(r.id))
        out.append(
            _view(r)
            | {"present": rule is not None, "counters": net_nft.counters(rule) if rule else None}
        )
    return out


@method("net.nat.status", right=Right.read, cli=Cli("net nat ls"))
async def nat_status(ctx: Context, p: NoParams) -> Json:
    """NAT: den's workspace masquerade, the DNAT and SNAT entries made here, forwarding."""
    inst = _instance(ctx)
    tables = await _thread(den_firewall.tables, inst)
    sysctl = await _thread(net_kernel.sysctl)
    return {
        "ip_forward": sysctl["ip_forward"],
        "workspace_masquerade": {
            "table": f"ip den{inst}-nat",
            "present": f"ip den{inst}-nat" in tables,
            "subnet": ctx.app.settings.network_subnet,
        },
        "dnat": await _nft_view(ctx, ("dnat",)),
        "snat": await _nft_view(ctx, ("snat",)),
    }


def _taps(instance: int, recorded: dict[str, NodeNetObject]) -> list[Json]:
    prefix = net_state.den_tap_prefix(instance)
    out = []
    seen = set()
    for link in net_kernel.interfaces():
        name = link["name"]
        mine = name in recorded
        den = prefix is not None and name.startswith(prefix)
        if link["kind"] != "tap" or not (mine or den):
            continue
        seen.add(name)
        out.append(
            {
                "name": name,
                "managed_by": "api" if mine else "workspace",
                "id": recorded[name].id if mine else None,
                "state": link["state"],
                "bridge": link["master"],
                "mtu": link["mtu"],
                "mac": link["mac"],
            }
        )
    for name, r in recorded.items():
        if name not in seen:
            out.append(
                {
                    "name": name,
                    "managed_by": "api",
                    "id": r.id,
                    "state": "missing",
                    "bridge": r.spec.get("bridge"),
                    "mtu": r.spec.get("mtu"),
                    "mac": r.spec.get("mac"),
                }
            )
    return out


@method("net.vm.list", right=Right.read, cli=Cli("net tap ls"))
async def vm_list(ctx: Context, p: NoParams) -> list[Json]:
    """The taps den manages: made by net.vm.create_tap, and den's workspace (microVM) taps."""
    recorded = {r.spec["name"]: r for r in await _records(ctx.db, ("tap",))}
    return await _thread(_taps, _instance(ctx), recorded)


def _verify(instance: int, records: list[tuple[int, str, Json]]) -> Json:
    rules = net_nft.present(instance)
    drift = []
    for rid, kind, spec in records:
        problem = net_state.present(kind, spec, rules, rid)
        if problem is not None:
            drift.append({"id": rid, "kind": kind, "spec": spec, "problem": problem})
    known = {net_nft.comment(rid) for rid, kind, _s in records if kind in net_state.NFT_KINDS}
    extra = sorted(c for c in (rules or {}) if c not in known)
    return {
        "ok": not drift and not extra,
        "records": len(records),
        "drift": drift,
        "unrecorded_rules": extra,
    }


@method("net.verify", right=Right.read, cli=Cli("net verify"))
async def verify(ctx: Context, p: NoParams) -> Json:
    """Drift between what den recorded (net.* writes) and what the kernel has."""
    rows = await _records(ctx.db)
    return await _thread(_verify, _instance(ctx), [(r.id, r.kind, r.spec) for r in rows])


def _health(instance: int, records: list[tuple[int, str, Json]]) -> list[Json]:
    checks: list[Json] = []
    try:
        n = len(net_kernel.interfaces())
        checks.append({"name": "netlink", "ok": True, "detail": f"{n} interfaces"})
    except Exception as exc:  # noqa: BLE001 - a health check reports, never raises
        checks.append({"name": "netlink", "ok": False, "detail": str(exc)[:200]})
    try:
        n = len(net_nft.table_names())
        checks.append({"name": "nftables", "ok": True, "detail": f"{n} tables"})
    except Exception as exc:  # noqa: BLE001
        checks.append({"name": "nftables", "ok": False, "detail": str(exc)[:200]})
    devs = net_kernel.default_route_devs()
    checks.append(
        {
            "name": "default_route",
            "ok": bool(devs),
            "detail": ", ".join(sorted(devs)) or "no default route",
        }
    )
    try:
        drift = _verify(instance, records)
        checks.append(
            {
                "name": "records",
                "ok": drift["ok"],
                "detail": f"{len(records)} recorded, {len(drift['drift'])} drifted",
            }
        )
    except Exception as exc:  # noqa: BLE001
        checks.append({"name": "records", "ok": False, "detail": str(exc)[:200]})
    try:
        st = net_kernel.conntrack_stats()
        full = st["max"] is not None and st["count"] >= 0.9 * st["max"]
        checks.append(
            {"name": "conntrack", "ok": not full, "detail": f"{st['count']} of {st['max']}"}
        )
    except Exception as exc:  # noqa: BLE001
        checks.append({"name": "conntrack", "ok": False, "detail": str(exc)[:200]})
    return checks


@method("net.health", right=Right.read, cli=Cli("net health"))
async def health(ctx: Context, p: NoParams) -> Json:
    """Structured health: netlink, nftables, default route, recorded objects, conntrack."""
    rows = await _records(ctx.db)
    checks = await _thread(_health, _instance(ctx), [(r.id, r.kind, r.spec) for r in rows])
    return {"status": "ok" if all(c["ok"] for c in checks) else "degraded", "checks": checks}


# -- writes --------------------------------------------------------------------------


@method("net.routes.add", right=Right.write, cli=Cli("net route add"))
async def routes_add(ctx: Context, p: RouteSpec) -> Json:
    """Add a route (never over one the kernel has); recorded and restored at start."""
    ctx.target = f"route:{p.dst}"
    async with _LOCK:
        spec = await _thread(net_state.check_route, _instance(ctx), _subnet(ctx), p.model_dump())
        if await _find(ctx.db, net_state.key("route", spec)) is not None:
            raise Conflict(f"a route {p.dst} (table {p.table}, metric {p.metric}) is recorded")
        row = await _record(ctx, "route", spec)
        await _thread(net_kernel.route_add, spec)
    return _view(row)


@method("net.routes.delete", right=Right.write, cli=Cli("net route rm"))
async def routes_delete(ctx: Context, p: RouteSpec) -> Json:
    """Delete a route (and its record, if den made it)."""
    ctx.target = f"route:{p.dst}"
    async with _LOCK:
        spec = await _thread(net_state.check_route, _instance(ctx), _subnet(ctx), p.model_dump())
        await _thread(net_kernel.route_delete, spec)
        await _forget(ctx, net_state.key("route", spec))
    return {"deleted": p.dst}


@method("net.bridge.add", right=Right.write, cli=Cli("net bridge add"))
async def bridge_add(ctx: Context, p: BridgeAdd) -> Json:
    """Create a bridge (up); recorded and restored at start."""
    spec = p.model_dump()
    ctx.target = f"bridge:{p.name}"
    net_state.check_new_name(_instance(ctx), p.name)
    async with _LOCK:
        if await _thread(net_kernel.link_exists, p.name):
            raise Conflict(f"an interface {p.name} exists")
        row = await _record(ctx, "bridge", spec)
        await _thread(net_kernel.bridge_add, p.name, p.stp, p.mtu)
    return _view(row)


async def _is_bridge(name: str) -> None:
    kind = await _thread(net_kernel.link_kind, name)
    if kind is None:
        raise NotFound(f"no interface {name}")
    if kind != "bridge":
        raise InvalidParams(f"{name} is a {kind}, not a bridge", field="bridge")


@method("net.bridge.delete", right=Right.write, cli=Cli("net bridge rm"))
async def bridge_delete(ctx: Context, p: NameParam) -> Json:
    """Delete a bridge (its ports stay, detached); its records go."""
    inst = _instance(ctx)
    ctx.target = f"bridge:{p.name}"
    async with _LOCK:
        name = await _thread(net_state.check_link, inst, p.name, "deleting it")
        await _is_bridge(name)
        await _thread(net_kernel.link_delete, name)
        await _forget(ctx, net_state.key("bridge", {"name": name}))
        for r in await _records(ctx.db, ("port", "connect")):
            if name in (r.spec.get("bridge"), r.spec.get("peer")):
                if r.kind == "connect":
                    await _thread(net_kernel.link_delete, r.spec["a"])
                await ctx.db.delete(r)
    return {"deleted": name}


@method("net.bridge.connect", right=Right.write, cli=Cli("net bridge connect"))
async def bridge_connect(ctx: Context, p: BridgeConnect) -> Json:
    """Connect two bridges with a veth pair (one end on each); recorded."""
    inst = _instance(ctx)
    ctx.target = f"bridge:{p.bridge}+{p.peer}"
    async with _LOCK:
        bridge = await _thread(net_state.check_link, inst, p.bridge, "connecting it")
        peer = await _thread(net_state.check_link, inst, p.peer, "connecting it")
        if bridge == peer:
            raise InvalidParams("a bridge cannot be connected to itself", field="peer")
        for br in (bridge, peer):
            await _is_bridge(br)
        a, b = net_state.connect_names(bridge, peer)
        spec = {"bridge": bridge, "peer": peer, "a": a, "b": b}
        if await _find(ctx.db, net_state.key("connect", spec)) is not None:
            raise Conflict(f"{p.bridge} and {p.peer} are connected")
        row = await _record(ctx, "connect", spec)
        await _thread(net_kernel.veth_pair, a, b, bridge, peer)
    return _view(row)


@method("net.bridge.add_port", right=Right.write, cli=Cli("net bridge port-add"))
async def bridge_add_port(ctx: Context, p: BridgePort) -> Json:
    """Make an interface a port of a bridge; recorded."""
    inst = _instance(ctx)
    ctx.target = f"bridge:{p.bridge}:{p.port}"
    async with _LOCK:
        bridge = await _thread(net_state.check_link, inst, p.bridge, "adding a port to it")
        port = await _thread(net_state.check_link, inst, p.port, "making it a bridge port")
        await _is_bridge(bridge)
        spec = {"bridge": bridge, "port": port}
        await _forget(ctx, net_state.key("port", spec))
        row = await _record(ctx, "port", spec)
        await _thread(net_kernel.set_master, port, bridge)
    return _view(row)


@method("net.bridge.remove_port", right=Right.write, cli=Cli("net bridge port-rm"))
async def bridge_remove_port(ctx: Context, p: BridgePort) -> Json:
    """Detach an interface from its bridge; its record goes."""
    inst = _instance(ctx)
    ctx.target = f"bridge:{p.bridge}:{p.port}"
    async with _LOCK:
        bridge = await _thread(net_state.check_link, inst, p.bridge, "removing a port from it")
        port = await _thread(net_state.check_link, inst, p.port, "detaching it")
        if await _thread(net_kernel.master_of, port) != bridge:
            raise NotFound(f"{p.port} is not a port of {p.bridge}")
        await _thread(net_kernel.set_master, port, None)
        await _forget(ctx, net_state.key("port", {"bridge": bridge, "port": port}))
    return {"removed": port, "bridge": bridge}


@method("net.vm.create_tap", right=Right.write, cli=Cli("net tap add"))
async def vm_create_tap(ctx: Context, p: TapCreate) -> Json:
    """Create a persistent tap (up, optionally on a bridge); recorded and restored at start."""
    inst = _instance(ctx)
    ctx.target = f"tap:{p.name}"
    spec = p.model_dump()
    net_state.check_new_name(inst, p.name)
    async with _LOCK:
        if p.bridge is not None:
            spec["bridge"] = await _thread(
                net_state.check_link, inst, p.bridge, "attaching a tap to it"
            )
            await _is_bridge(spec["bridge"])
        if await _thread(net_kernel.link_exists, p.name):
            raise Conflict(f"an interface {p.name} exists")
        row = await _record(ctx, "tap", spec)
        try:
            await _thread(net_kernel.tap_create, spec)
        except BaseException:
            await _thread(net_kernel.link_delete, p.name)
            raise
    return _view(row)


@method("net.vm.delete_tap", right=Right.write, cli=Cli("net tap rm"))
async def vm_delete_tap(ctx: Context, p: NameParam) -> Json:
    """Delete a tap made by net.vm.create_tap."""
    ctx.target = f"tap:{p.name}"
    async with _LOCK:
        name = await _thread(net_state.check_link, _instance(ctx), p.name, "deleting it")
        row = await _find(ctx.db, net_state.key("tap", {"name": name}))
        if row is None:
            raise NotFound(f"{p.name} is not a tap made by net.vm.create_tap")
        await _thread(net_kernel.link_delete, name)
        await ctx.db.delete(row)
    return {"deleted": name}


async def _add_nft(ctx: Context, kind: str, spec: Json) -> Json:
    ctx.target = f"{kind}:{net_state.key(kind, spec)}"
    async with _LOCK:
        if await _find(ctx.db, net_state.key(kind, spec)) is not None:
            raise Conflict(f"the same {kind} is recorded")
        row = await _record(ctx, kind, spec)
        await _apply_nft(ctx)
    return _view(row) | {"table": f"{net_nft.FAMILY} {net_nft.table_name(_instance(ctx))}"}


async def _remove_nft(ctx: Context, kind: str, rid: int) -> Json:
    ctx.target = f"{kind}:{rid}"
    async with _LOCK:
        row = await ctx.db.get(NodeNetObject, rid)
        if row is None or row.kind != kind:
            raise NotFound(f"no {kind} {rid}")
        await ctx.db.delete(row)
        await ctx.db.flush()
        await _apply_nft(ctx)
    return {"deleted": rid}


@method("net.firewall.add_rule", right=Right.write, cli=Cli("net fw allow"))
async def firewall_add_rule(ctx: Context, p: RuleAdd) -> Json:
    """Add an input allow rule to den's node table (an accept: it cannot undo a drop of another table)."""
    spec = await _thread(net_state.check_rule, _instance(ctx), p.model_dump(exclude_none=True))
    return await _add_nft(ctx, "rule", spec)


@method("net.firewall.remove_rule", right=Right.write, cli=Cli("net fw rm"))
async def firewall_remove_rule(ctx: Context, p: IdParam) -> Json:
    """Remove an input allow rule net.firewall.add_rule made, by its id.

    Only den's own rules: the host's tables (its firewall's drops, other tools')
    are not den's to change, as mounts den did not make are not vol.unmount's.
    """
    return await _remove_nft(ctx, "rule", p.id)


@method("net.nat.add_dnat", right=Right.write, cli=Cli("net nat dnat"))
async def nat_add_dnat(ctx: Context, p: DnatAdd) -> Json:
    """Forward a port of this host (DNAT: connections addressed to one of its addresses) to
    another address; in den's node table, recorded. Never what den answers for."""
    spec = await _thread(
        net_state.check_dnat,
        _instance(ctx),
        _subnet(ctx),
        den_ports(ctx.app),
        p.model_dump(exclude_none=True),
    )
    return await _add_nft(ctx, "dnat", spec)


@method("net.nat.remove_dnat", right=Right.write, cli=Cli("net nat dnat-rm"))
async def nat_remove_dnat(ctx: Context, p: IdParam) -> Json:
    """Remove a port forward net.nat.add_dnat made, by its id."""
    return await _remove_nft(ctx, "dnat", p.id)


@method("net.nat.add_snat", right=Right.write, cli=Cli("net nat snat"))
async def nat_add_snat(ctx: Context, p: SnatAdd) -> Json:
    """Source NAT (masquerade, or to one address) of a network's traffic; recorded."""
    spec = await _thread(
        net_state.check_snat, _instance(ctx), _subnet(ctx), p.model_dump(exclude_none=True)
    )
    return await _add_nft(ctx, "snat", spec)


@method("net.nat.remove_snat", right=Right.write, cli=Cli("net nat snat-rm"))
async def nat_remove_snat(ctx: Context, p: IdParam) -> Json:
    """Remove a source NAT net.nat.add_snat made, by its id."""
    return await _remove_nft(ctx, "snat", p.id)


@method(
    "net.conntrack.flush",
    right=Right.admin,
    cli=Cli("net conntrack flush", confirm="Flush connection tracking entries?"),
)
async def conntrack_flush(ctx: Context, p: ConntrackFlush) -> Json:
    """Flush connection tracking entries (all, or one zone's)."""
    ctx.target = "conntrack" if p.zone is None else f"conntrack:zone {p.zone}"
    return {"flushed": await _thread(net_kernel.conntrack_flush, p.zone)}


# -- start -----------------------------------------------------------------------------


async def restore(app: App) -> None:
    """Put back what net.* made (after a reboot, or what someone removed); prune the gone.

    Called once when den starts. Every record passes the live call's checks
    again: one whose object cannot come back (its interface or bridge vanished)
    or may no longer (it is now protected: the default route moved onto it, its
    name is now den's) is deleted, not applied, with an audit event naming why.
    Never stops den: a failure is logged.
    """
    start = time.perf_counter()
    async with _LOCK, app.sessions() as db:
        rows = await _records(db)
        if not rows:
            # A table left by a den that crashed between a removal and its commit.
            await _thread(net_nft.apply, app.settings.instance, [])
            return
        try:
            gone = await _thread(
                net_state.restore,
                app.settings.instance,
                app.settings.network_subnet,
                den_ports(app),
                [(r.id, r.kind, r.spec) for r in rows],
            )
        except BackendFailure as exc:
            log.error("cannot restore the node's network objects: %s", exc.message)
            return
        for r in rows:
            if r.id in gone:
                await db.delete(r)
                db.add(
                    AuditEvent(
                        actor="den",
                        via="startup",
                        method="net.prune",
                        target=f"{r.kind}:{r.id}",
                        params={"spec": r.spec},
                        outcome="ok",
                        error=gone[r.id][:2000],
                        duration_ms=round((time.perf_counter() - start) * 1e3, 3),
                    )
                )
                log.warning("net: pruned %s %s: %s", r.kind, r.spec, gone[r.id])
        await db.commit()
        log.info("net: %d recorded objects restored", len(rows) - len(gone))
