"""What the node API may touch, and its records brought back into the kernel.

Protected objects: what den itself or the host's connectivity depends on:
loopback, every den instance's bridge (``den<N>``), veths (``d<N>-``) and
taps, nft tables named ``den*``, and the interfaces default routes leave
through. Names in den's own namespaces are refused for new objects too, so
that the API never makes something den would take for its own.

Records (den.db.models.NodeNetObject) are restored in dependency order:
bridges, taps, bridge connections, ports, routes, then the nft table. A record
whose object cannot come back because what it hangs on is gone (a port's
interface, a route's device, a tap's bridge) is pruned by the caller, with an
audit event.

Functions without ``async`` block: run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from den.errors import BackendFailure, Forbidden
from den.net import names
from den.node import net_kernel, net_nft

Json = dict[str, Any]
_DEN_BRIDGE = re.compile(r"den\d")
_DEN_VETH = re.compile(r"d\d+-")
# Restore order: what others hang on first.
ORDER = ("bridge", "tap", "connect", "port", "route", "rule", "dnat", "snat")
NFT_KINDS = ("rule", "dnat", "snat")


def den_tap_prefix(instance: int) -> str | None:
    """The prefix of den's workspace taps (den.net.names.tap, the microVM backend's)."""
    tap = getattr(names, "tap", None)
    if tap is None:
        return None
    return str(tap(instance, ""))


def den_owned(instance: int, name: str) -> str | None:
    """Why ``name`` is den's own interface name, or None."""
    if name == names.bridge(instance):
        return "den's bridge"
    if _DEN_BRIDGE.match(name):
        return "in den's namespace (den<N>: den's bridges and objects)"
    if _DEN_VETH.match(name):
        return "a den workspace's veth"
    prefix = den_tap_prefix(instance)
    if prefix and name.startswith(prefix):
        return "a den workspace's tap"
    return None


def protected_reason(instance: int, name: str) -> str | None:
    if name == "lo":
        return "loopback"
    reason = den_owned(instance, name)
    if reason:
        return reason
    if name in net_kernel.default_route_devs():
        return "the interface carrying the default route"
    return None


def check_link(instance: int, name: str, what: str) -> None:
    """Refuse a change to a protected interface, naming it."""
    reason = protected_reason(instance, name)
    if reason:
        raise Forbidden(
            f"{name} is protected ({reason}): {what} refused",
            data={"object": name, "reason": reason},
        )


def check_new_name(instance: int, name: str) -> None:
    reason = den_owned(instance, name) or ("loopback" if name == "lo" else None)
    if reason:
        raise Forbidden(
            f"{name} is a name den keeps for itself ({reason}): pick another",
            data={"object": name, "reason": reason},
        )


def check_den_iface(instance: int, name: str) -> None:
    """Refuse a rule matching one of den's own interfaces (its tables decide their traffic)."""
    reason = den_owned(instance, name)
    if reason:
        raise Forbidden(
            f"{name} is protected ({reason}): its traffic is den's tables' to decide",
            data={"object": name, "reason": reason},
        )


def check_table(family: str, table: str) -> None:
    if table.startswith("den"):
        raise Forbidden(
            f"nft table {family} {table} is den's (tables named den* are protected)",
            data={"object": f"{family} {table}", "reason": "den's nft table"},
        )


def check_route(instance: int, spec: Json) -> None:
    if spec["dst"] in ("0.0.0.0/0", "::/0") and spec.get("table", 254) == 254:
        raise Forbidden(
            "the main table's default route is protected (the host's connectivity)",
            data={"object": f"default route ({spec['dst']})", "reason": "default route"},
        )
    dev = net_kernel.route_dev(spec)
    if dev is not None:
        check_link(instance, dev, f"a route through {dev}")


# -- records -----------------------------------------------------------------------


def key(kind: str, spec: Json) -> str:
    """What identifies a record's object: one record per object."""
    if kind in ("bridge", "tap"):
        return f"{kind}:{spec['name']}"
    if kind == "port":
        return f"port:{spec['port']}"
    if kind == "connect":
        return f"connect:{spec['a']}"
    if kind == "route":
        return f"route:{spec.get('table', 254)}:{spec['dst']}:{spec.get('metric', 0)}"
    digest = hashlib.sha256(net_nft.dumps(spec).encode()).hexdigest()[:24]
    return f"{kind}:{digest}"


def connect_names(a: str, b: str) -> tuple[str, str]:
    """The veth ends joining bridges a and b: short, stable, outside den's names."""
    h = hashlib.sha256(f"{a}\0{b}".encode()).hexdigest()[:8]
    return f"nc{h}a", f"nc{h}b"


def present(kind: str, spec: Json, nft_rules: dict[str, Json] | None, rid: int) -> str | None:
    """None when the object is in the kernel as recorded, else what is wrong."""
    if kind in NFT_KINDS:
        if nft_rules is None:
            return "den's node nft table is missing"
        return None if net_nft.comment(rid) in nft_rules else "the rule is missing from the table"
    if kind in ("bridge", "tap"):
        found = net_kernel.link_kind(spec["name"])
        if found is None:
            return f"{spec['name']} is missing"
        if found != kind:
            return f"{spec['name']} is a {found}, not a {kind}"
        if kind == "tap" and spec.get("bridge"):
            master = net_kernel.master_of(spec["name"])
            if master != spec["bridge"]:
                return f"{spec['name']} is not on {spec['bridge']}"
        return None
    if kind == "port":
        master = net_kernel.master_of(spec["port"])
        return None if master == spec["bridge"] else f"{spec['port']} is not on {spec['bridge']}"
    if kind == "connect":
        for end, br in ((spec["a"], spec["bridge"]), (spec["b"], spec["peer"])):
            if net_kernel.master_of(end) != br:
                return f"{end} is not on {br}"
        return None
    if kind == "route":
        return None if net_kernel.route_present(spec) else f"route {spec['dst']} is missing"
    return f"unknown kind {kind}"


def restore_link(kind: str, spec: Json) -> str | None:
    """Bring one link-level record back; None, or why it cannot come back (prune it)."""
    if kind == "bridge":
        net_kernel.bridge_add(spec["name"], spec.get("stp", False), spec.get("mtu"))
        return None
    if kind == "tap":
        if spec.get("bridge") and net_kernel.link_kind(spec["bridge"]) != "bridge":
            return f"its bridge {spec['bridge']} is gone"
        net_kernel.tap_create(spec)
        return None
    if kind == "connect":
        for br in (spec["bridge"], spec["peer"]):
            if net_kernel.link_kind(br) != "bridge":
                return f"bridge {br} is gone"
        net_kernel.veth_pair(spec["a"], spec["b"], spec["bridge"], spec["peer"])
        return None
    if kind == "port":
        if not net_kernel.link_exists(spec["port"]):
            return f"interface {spec['port']} is gone"
        if net_kernel.link_kind(spec["bridge"]) != "bridge":
            return f"bridge {spec['bridge']} is gone"
        net_kernel.set_master(spec["port"], spec["bridge"])
        return None
    if kind == "route":
        if spec.get("dev") and not net_kernel.link_exists(spec["dev"]):
            return f"interface {spec['dev']} is gone"
        try:
            net_kernel.route_add(spec)
        except BackendFailure as exc:
            return f"the kernel refused it: {exc.message}"
        return None
    return None


def restore(instance: int, records: list[tuple[int, str, Json]]) -> dict[int, str]:
    """Restore every record; {id: why} of those that cannot come back."""
    gone: dict[int, str] = {}
    for kind in ORDER:
        if kind in NFT_KINDS:
            continue
        for rid, k, spec in records:
            if k != kind:
                continue
            try:
                why = restore_link(k, spec)
            except BackendFailure as exc:
                why = exc.message
            if why is not None:
                gone[rid] = why
    rules = [r for r in records if r[1] in NFT_KINDS]
    net_nft.apply(instance, rules)
    return gone
