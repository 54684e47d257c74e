"""The instance's nftables tables: isolation, host protection and egress policy.

Two tables per instance, replaced atomically as a whole:

* ``inet denN``: workspaces reach nothing on the host but den's own
  listeners; nothing from outside reaches into a workspace; only root (den
  itself) on the host may open connections to workspace addresses; egress
  goes to the internet but not to private, link-local or reserved ranges
  (``blocked``), unless an admin opened a destination (``allow_*`` sets,
  per workspace address); ``deny_*`` sets close destinations on top; no
  IPv6 is forwarded from a workspace at all.
* ``ip denN-nat``: masquerade of the subnet's traffic that leaves the host.

The admin exceptions live in interval sets keyed by workspace address, so
that they change with one atomic set update, not a ruleset reload.
"""

from __future__ import annotations

import ipaddress
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from den.errors import BackendFailure

try:
    import nftables
except ImportError:  # pragma: no cover - reported by `den init --check`
    nftables = None

# Destinations closed by default. What a workspace must not reach through the
# host: the LAN and the cloud's internal networks (RFC 1918, CGNAT, which
# Tailscale and carrier networks use), link-local (169.254.169.254 is a cloud
# metadata service answering with the host's identity), loopback, "this
# network", IETF protocol assignments, multicast and the reserved 240/4 with
# the broadcast address. The documentation (TEST-NET) and benchmarking
# (198.18.0.0/15) ranges stay open: they are assigned to no network, and
# stand-in "internet" hosts in labs and tests use them. An operator whose LAN
# has public addresses closes it with `den egress deny`.
BLOCKED4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)

Action = Literal["allow", "deny"]
Proto = Literal["tcp", "udp"]


@dataclass(frozen=True)
class Exception4:
    """One admin exception as the kernel sees it: from one workspace address."""

    action: Action
    source: str  # a workspace's address
    dest: str  # a CIDR
    proto: Proto | None = None  # None: every protocol
    port: int | None = None  # None: every port (only with a protocol)


# (action, kind) -> set name; kind: "all" protocols, one "proto", one "port".
_KINDS = ("all", "proto", "port")
_TYPES = {
    "all": "ipv4_addr . ipv4_addr",
    "proto": "ipv4_addr . ipv4_addr . inet_proto",
    "port": "ipv4_addr . ipv4_addr . inet_proto . inet_service",
}
_MATCH = {
    "all": "ip saddr . ip daddr",
    "proto": "ip saddr . ip daddr . meta l4proto",
    "port": "ip saddr . ip daddr . meta l4proto . th dport",
}


def set_name(action: Action, kind: str) -> str:
    return f"{action}_{kind}"


def elements(entries: Iterable[Exception4]) -> dict[str, list[str]]:
    """The elements of each exception set, without overlaps.

    The kernel's concatenated interval sets refuse overlapping elements. One
    set per kind keeps every field but the destination exact, so two elements
    can only overlap by nested destinations: collapsing them per key removes
    the overlap without changing what matches.
    """
    groups: dict[tuple[str, str, str], list[ipaddress.IPv4Network]] = defaultdict(list)
    for e in entries:
        kind = "all" if e.proto is None else "proto" if e.port is None else "port"
        key = e.source
        if e.proto is not None:
            key += f" . {e.proto}"
        if e.port is not None:
            key += f" . {e.port}"
        groups[(set_name(e.action, kind), key, kind)].append(
            ipaddress.IPv4Network(e.dest, strict=False)
        )
    out: dict[str, list[str]] = {set_name(a, k): [] for a in ("allow", "deny") for k in _KINDS}
    for (name, key, _kind), dests in sorted(groups.items()):
        src, *rest = key.split(" . ")
        for net in ipaddress.collapse_addresses(dests):
            out[name].append(" . ".join([src, str(net), *rest]))
    return out


def _set(name: str, kind: str, elems: list[str]) -> str:
    body = f" elements = {{ {', '.join(elems)} }}" if elems else ""
    return f"set {name} {{ type {_TYPES[kind]}; flags interval;{body} }}"


def _dns(resolvers: list[str]) -> str:
    elems = [f"{r} . {p} . 53" for r in sorted(set(resolvers)) for p in ("udp", "tcp")]
    body = f" elements = {{ {', '.join(elems)} }}" if elems else ""
    return f"set dns {{ type ipv4_addr . inet_proto . inet_service;{body} }}"


@dataclass
class Policy:
    """Everything the instance's tables are made of."""

    bridge: str
    subnet: str
    ports: list[int]
    egress: bool
    # The host's nameservers that workspaces are given: reachable on port 53
    # even when they sit in a private range.
    resolvers: list[str]
    exceptions: list[Exception4]
    # den turned ip_forward on: forwarding that involves no den bridge is
    # dropped, so the host routes for nobody else because of den.
    guard_forward: bool
    # The account den's Caddy runs as: besides root, the only host user that
    # may open connections to workspaces (it proxies their URLs).
    web_uid: int | None = None


def ruleset(instance: int, p: Policy) -> str:
    table, nat = f"den{instance}", f"den{instance}-nat"
    br = p.bridge
    allowed = ", ".join(str(x) for x in sorted(set(p.ports)) if x) or "0"
    uids = ", ".join(str(u) for u in sorted({0, p.web_uid or 0}))
    sets = elements(p.exceptions)
    decls = "\n    ".join(
        [_set(set_name(a, k), k, sets[set_name(a, k)]) for a in ("allow", "deny") for k in _KINDS]
        + [
            _dns(p.resolvers),
            f"set blocked {{ type ipv4_addr; flags interval; elements = {{ {', '.join(BLOCKED4)} }} }}",
        ]
    )
    # Other den instances' bridges are "den*" too: one instance's guard never
    # drops another's traffic. IPv4 only: den never touches IPv6 forwarding.
    guard = (
        'meta nfproto ipv4 iifname != "den*" oifname != "den*" counter drop'
        if p.guard_forward
        else ""
    )
    if p.egress:
        policy = "\n        ".join(
            [f'iifname "{br}" {_MATCH[k]} @deny_{k} counter drop' for k in _KINDS]
            + [f'iifname "{br}" ip daddr . meta l4proto . th dport @dns accept']
            + [f'iifname "{br}" {_MATCH[k]} @allow_{k} counter accept' for k in _KINDS]
            + [f'iifname "{br}" ip daddr @blocked counter drop', f'iifname "{br}" counter accept']
        )
    else:
        policy = f'iifname "{br}" counter drop'
    # The metadata service (den.meta) needs no rule: den listens on
    # 169.254.169.254 inside each workspace's own netns (on its lo), so those
    # connections never leave the namespace. Packets to 169.254.169.254 that do
    # reach the bridge (another link-local address) stay `blocked`.
    return f"""
add table inet {table}
delete table inet {table}
table inet {table} {{
    {decls}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{br}" ct state established,related accept
        iifname "{br}" tcp dport {{ {allowed} }} accept
        iifname "{br}" counter drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        {guard}
        iifname "{br}" oifname "{br}" counter drop
        oifname "{br}" ct state established,related accept
        oifname "{br}" counter drop
        iifname "{br}" meta nfproto ipv6 counter drop
        {policy}
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        oifname "{br}" meta skuid != {{ {uids} }} counter reject
    }}
}}
add table ip {nat}
delete table ip {nat}
table ip {nat} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {p.subnet} oifname != "{br}" masquerade
    }}
}}
"""


def nft() -> Any:
    """A libnftables handle that answers in JSON (den.node.net_nft uses it too)."""
    if nftables is None:
        raise BackendFailure("python3-nftables is not installed; run `den init`")
    handle = nftables.Nftables()
    handle.set_json_output(True)
    return handle


def run(text: str) -> str:
    """Apply nft commands ``text`` in the calling thread's network namespace."""
    rc, out, err = nft().cmd(text)
    if rc != 0:
        raise BackendFailure(f"nftables refused the ruleset: {err.strip()}")
    return str(out)


def apply(instance: int, policy: Policy) -> None:
    run(ruleset(instance, policy))


def update_exceptions(instance: int, entries: Iterable[Exception4]) -> None:
    """Replace the exception sets' elements in one transaction (the table must exist)."""
    table = f"inet den{instance}"
    lines = []
    for name, elems in elements(entries).items():
        lines.append(f"flush set {table} {name}")
        if elems:
            lines.append(f"add element {table} {name} {{ {', '.join(elems)} }}")
    run("\n".join(lines))


def remove(instance: int) -> None:
    for family, name in (("inet", f"den{instance}"), ("ip", f"den{instance}-nat")):
        rc, _out, _err = nft().cmd(f"delete table {family} {name}")
        del rc  # missing is fine


def tables(instance: int) -> list[str]:
    """Names of this instance's tables present in the kernel."""
    out = json.loads(run("list tables") or "{}")
    names = []
    for item in out.get("nftables", []):
        t = item.get("table")
        if t and t["name"] in (f"den{instance}", f"den{instance}-nat"):
            names.append(f"{t['family']} {t['name']}")
    return sorted(names)


def show(instance: int) -> str:
    """The instance's ruleset as nft prints it."""
    nft = nftables.Nftables() if nftables else None
    if nft is None:
        return ""
    parts = []
    for family, name in (("inet", f"den{instance}"), ("ip", f"den{instance}-nat")):
        rc, out, _err = nft.cmd(f"list table {family} {name}")
        if rc == 0:
            parts.append(out)
    return "\n".join(parts)
