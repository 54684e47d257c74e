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
import ipaddress
import re
from typing import Any

from den import meta
from den.errors import DenError, Forbidden
from den.net import names
from den.node import net_kernel, net_nft

Json = dict[str, Any]
_DEN_BRIDGE = re.compile(r"den\d")
_DEN_VETH = re.compile(r"d\d+-")
# Every instance's taps (den.net.names.tap: t<N>-), not only this one's.
_DEN_TAP = re.compile(r"t\d+-")
# Restore order: what others hang on first.
ORDER = ("bridge", "tap", "connect", "port", "route", "rule", "dnat", "snat")
NFT_KINDS = ("rule", "dnat", "snat")
# Shorter prefixes in the main table shadow the default route for most of the
# address space (0.0.0.0/1 + 128.0.0.0/1 replace it outright).
MIN_PREFIX = {4: 8, 6: 16}


def den_tap_prefix(instance: int) -> str:
    """The prefix of this instance's workspace taps (den.net.names.tap, the microVM backend's)."""
    return names.tap(instance, "")


def den_owned(instance: int, name: str) -> str | None:
    """Why ``name`` is den's own interface name (of any instance), or None."""
    if name == names.bridge(instance):
        return "den's bridge"
    if _DEN_BRIDGE.match(name):
        return "in den's namespace (den<N>: den's bridges and objects)"
    if _DEN_VETH.match(name):
        return "a den workspace's veth"
    if _DEN_TAP.match(name):
        return "a den workspace's tap"
    return None


def _protected_links(instance: int) -> dict[int, str]:
    """ifindex -> why, for every existing interface den or the host's connectivity needs:
    the default-route interfaces and every device below them (bridge ports, bond
    members, a VLAN's or macvlan's parent, down to the NIC), and the ports of den's
    bridges. By index: a name may be an altname."""
    links, defaults = net_kernel.topology()
    out: dict[int, str] = {}
    for top in sorted(defaults):
        below = f"below {links[top]['name']}, the interface carrying the default route"
        todo = [(top, "the interface carrying the default route")]
        while todo:
            i, why = todo.pop()
            if i in out or i not in links:
                continue
            out[i] = why
            todo += [(j, below) for j, link in links.items() if link["master"] == i]
            if links[i]["parent"]:
                todo.append((links[i]["parent"], below))
    for i, link in links.items():
        master = links.get(link["master"] or 0)
        if master is not None and den_owned(instance, master["name"]):
            out.setdefault(i, f"a port of den's bridge {master['name']}")
    return out


def inspect(instance: int, name: str) -> tuple[str, str | None]:
    """(the interface's primary name, why it is protected or None).

    ``name`` may be an alternative name: the kernel resolves those too, so the
    check is on the interface it names, and callers act on the primary name.
    A name no interface has comes back as given.
    """
    if name == "lo":
        return name, "loopback"
    found = net_kernel.resolve(name)
    if found is None:
        return name, den_owned(instance, name)
    idx, primary = found
    reason = den_owned(instance, primary) or den_owned(instance, name)
    if primary == "lo":
        reason = "loopback"
    return primary, reason or _protected_links(instance).get(idx)


def protected_reason(instance: int, name: str) -> str | None:
    return inspect(instance, name)[1]


def check_link(instance: int, name: str, what: str) -> str:
    """Refuse a change to a protected interface, naming it; its primary name otherwise."""
    primary, reason = inspect(instance, name)
    if reason:
        shown = name if primary == name else f"{name} ({primary})"
        raise Forbidden(
            f"{shown} is protected ({reason}): {what} refused",
            data={"object": primary, "reason": reason},
        )
    return primary


def check_new_name(instance: int, name: str) -> None:
    reason = den_owned(instance, name) or ("loopback" if name == "lo" else None)
    if reason:
        raise Forbidden(
            f"{name} is a name den keeps for itself ({reason}): pick another",
            data={"object": name, "reason": reason},
        )


def check_den_iface(instance: int, name: str) -> str:
    """Refuse a rule matching one of den's own interfaces (its tables decide their traffic);
    the primary name of an existing interface (nft matches iifname by it), else ``name``."""
    found = net_kernel.resolve(name)
    primary = found[1] if found is not None else name
    reason = den_owned(instance, primary) or den_owned(instance, name)
    if reason:
        raise Forbidden(
            f"{name} is protected ({reason}): its traffic is den's tables' to decide",
            data={"object": primary, "reason": reason},
        )
    return primary


def den_networks(subnet: str) -> list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str]]:
    """The networks den answers for on this node: the workspace subnet and the metadata address."""
    return [
        (ipaddress.ip_network(subnet), f"den's workspace subnet {subnet}"),
        (ipaddress.ip_network(f"{meta.ADDRESS}/32"), f"den's metadata address {meta.ADDRESS}"),
    ]


def check_den_network(subnet: str, cidr: str, what: str) -> None:
    """Refuse ``cidr`` when it overlaps a network den answers for."""
    net = ipaddress.ip_network(cidr)
    for guarded, why in den_networks(subnet):
        if net.version == guarded.version and net.overlaps(guarded):
            raise Forbidden(
                f"{what} {cidr} overlaps {why}: refused",
                data={"object": str(guarded), "reason": why},
            )


def check_route(instance: int, subnet: str, spec: Json) -> Json:
    """Refuse a route den or the host's connectivity depends on; ``spec`` with its
    device's primary name."""
    net = ipaddress.ip_network(spec["dst"])
    if net.prefixlen == 0 and spec.get("table", 254) == 254:
        raise Forbidden(
            "the main table's default route is protected (the host's connectivity)",
            data={"object": f"default route ({spec['dst']})", "reason": "default route"},
        )
    if spec.get("table", 254) == 254 and net.prefixlen < MIN_PREFIX[net.version]:
        raise Forbidden(
            f"a route {spec['dst']} in the main table would shadow the default route "
            f"(prefixes shorter than /{MIN_PREFIX[net.version]} are refused)",
            data={"object": f"default route ({spec['dst']})", "reason": "default route"},
        )
    # Any table: a policy rule (the host's) may send traffic through it.
    check_den_network(subnet, spec["dst"], "a route to")
    out = dict(spec)
    if spec.get("dev"):
        out["dev"] = check_link(instance, spec["dev"], f"a route through {spec['dev']}")
    dev = net_kernel.route_dev(out)
    if dev is not None:
        check_link(instance, dev, f"a route through {dev}")
    return out


def check_rule(instance: int, spec: Json) -> Json:
    """An input allow rule's spec, checked, with its interface's primary name."""
    out = dict(spec)
    if spec.get("iface"):
        out["iface"] = check_den_iface(instance, spec["iface"])
    return out


def check_dnat(instance: int, subnet: str, ports: set[int], spec: Json) -> Json:
    """A port forward's spec, checked: never to or from what den answers for (the
    workspace subnet, the metadata address, den's listening ports)."""
    out = check_rule(instance, spec)
    if spec.get("dst"):
        check_den_network(subnet, spec["dst"], "a DNAT of")
    check_den_network(subnet, spec["to_addr"], "a DNAT to")
    if spec["port"] in ports:
        raise Forbidden(
            f"port {spec['port']} is one den listens on (ssh gateway, API, web, mail): "
            "a DNAT of it is refused",
            data={"object": f"port {spec['port']}", "reason": "den's listening port"},
        )
    return out


def check_snat(instance: int, subnet: str, spec: Json) -> Json:
    """A source NAT's spec, checked: den's own masquerade decides its workspaces' traffic."""
    out = dict(spec)
    if spec.get("oif"):
        out["oif"] = check_den_iface(instance, spec["oif"])
    check_den_network(subnet, spec["source"], "a source NAT of")
    return out


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


def _recheck(instance: int, subnet: str, ports: set[int], kind: str, spec: Json) -> None:
    """The live call's checks again, for a record made when they passed: raises
    DenError when what it touches is now protected (or its name now den's)."""
    if kind in ("bridge", "tap"):
        check_new_name(instance, spec["name"])
        check_link(instance, spec["name"], f"restoring the {kind}")
        if kind == "tap" and spec.get("bridge"):
            check_link(instance, spec["bridge"], "attaching a tap to it")
    elif kind == "connect":
        for name in (spec["bridge"], spec["peer"], spec["a"], spec["b"]):
            check_link(instance, name, "connecting it")
    elif kind == "port":
        check_link(instance, spec["bridge"], "adding a port to it")
        check_link(instance, spec["port"], "making it a bridge port")
    elif kind == "route":
        check_route(instance, subnet, spec)
    elif kind == "rule":
        check_rule(instance, spec)
    elif kind == "dnat":
        check_dnat(instance, subnet, ports, spec)
    elif kind == "snat":
        check_snat(instance, subnet, spec)


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
        if net_kernel.route_present(spec):
            return None
        try:
            net_kernel.route_add(spec)
        except DenError as exc:
            return f"the kernel refused it: {exc.message}"
        return None
    return None


def restore(
    instance: int, subnet: str, ports: set[int], records: list[tuple[int, str, Json]]
) -> dict[int, str]:
    """Restore every record the live checks still allow; {id: why} of those that cannot
    (or may no longer) come back: the caller prunes them."""
    gone: dict[int, str] = {}
    for kind in ORDER:
        for rid, k, spec in records:
            if k != kind:
                continue
            try:
                _recheck(instance, subnet, ports, k, spec)
            except DenError as exc:
                gone[rid] = f"no longer allowed: {exc.message}"
                continue
            if kind in NFT_KINDS:
                continue
            try:
                why = restore_link(k, spec)
            except DenError as exc:
                why = exc.message
            if why is not None:
                gone[rid] = why
    rules = [r for r in records if r[1] in NFT_KINDS and r[0] not in gone]
    net_nft.apply(instance, rules)
    return gone
