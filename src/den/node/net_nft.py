"""The node API's nftables table, through nftables' JSON API.

One table per instance, ``inet den<inst>_node``, holds what net.firewall.* and
net.nat.* made: input allow rules, DNAT port forwards and SNAT/masquerade. Its
content is a function of den's records: every change rebuilds it in one
transaction (add, delete, add: atomic, and a table someone flushed or changed
comes back whole). Each rule carries the comment ``den:<record id>``, which is
how net.verify finds it in the kernel.

Call from a worker thread: libnftables blocks.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from den.errors import BackendFailure
from den.net.firewall import nft

FAMILY = "inet"
Json = dict[str, Any]


def table_name(instance: int) -> str:
    return f"den{instance}_node"


def comment(record_id: int) -> str:
    return f"den:{record_id}"


def run(commands: list[Json]) -> Json:
    """Run JSON commands in one transaction; the parsed output."""
    rc, out, err = nft().json_cmd({"nftables": commands})
    if rc != 0:
        raise BackendFailure(f"nftables refused the change: {str(err).strip()[:500]}")
    return out if isinstance(out, dict) else {}


def ruleset() -> list[Json]:
    """Every object of the ruleset (tables, chains, rules, sets), as nft lists them."""
    out = run([{"list": {"ruleset": None}}])
    return [item for item in out.get("nftables", []) if "metainfo" not in item]


# -- expressions -----------------------------------------------------------------


def _eq(left: Json, right: Any) -> Json:
    return {"match": {"op": "==", "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _net(cidr: str) -> tuple[str, Any]:
    """(payload protocol, right side) of a match on an address or network."""
    net = ipaddress.ip_network(cidr)
    proto = "ip" if net.version == 4 else "ip6"
    full = net.prefixlen == net.max_prefixlen
    right = (
        str(net.network_address)
        if full
        else {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}
    )
    return proto, right


def _addr_match(cidr: str, field: str) -> list[Json]:
    proto, right = _net(cidr)
    return [_eq({"payload": {"protocol": proto, "field": field}}, right)]


def _nfproto(version: int) -> Json:
    return _eq(_meta("nfproto"), "ipv4" if version == 4 else "ipv6")


def _ports(proto: str, port: int, end: int | None = None) -> Json:
    right: Any = port if end is None or end == port else {"range": [port, end]}
    return _eq({"payload": {"protocol": proto, "field": "dport"}}, right)


def rule_exprs(spec: Json) -> list[Json]:
    """An input allow rule (net.firewall.add_rule's params)."""
    expr: list[Json] = []
    version = {"ipv4": 4, "ipv6": 6}.get(spec.get("family") or "")
    if spec.get("source"):
        version = ipaddress.ip_network(spec["source"]).version
    if spec.get("proto") == "icmp":
        version = 4
    elif spec.get("proto") == "icmpv6":
        version = 6
    if version is not None:
        expr.append(_nfproto(version))
    if spec.get("iface"):
        expr.append(_eq(_meta("iifname"), spec["iface"]))
    if spec.get("source"):
        expr += _addr_match(spec["source"], "saddr")
    proto = spec.get("proto") or "any"
    if proto != "any":
        expr.append(_eq(_meta("l4proto"), proto if proto != "icmpv6" else "ipv6-icmp"))
    if spec.get("port") is not None:
        expr.append(_ports(proto, spec["port"], spec.get("port_end")))
    return [*expr, {"counter": None}, {"accept": None}]


def dnat_exprs(spec: Json) -> list[Json]:
    """A port forward: only of connections to this host (fib daddr type local), never
    of what arrives from den's bridges (its workspaces' traffic is den's tables')."""
    version = ipaddress.ip_address(spec["to_addr"]).version
    expr = [
        _nfproto(version),
        {"match": {"op": "!=", "left": _meta("iifname"), "right": "den*"}},
        _eq({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
    ]
    if spec.get("iface"):
        expr.append(_eq(_meta("iifname"), spec["iface"]))
    if spec.get("dst"):
        expr += _addr_match(spec["dst"], "daddr")
    expr.append(_eq(_meta("l4proto"), spec["proto"]))
    expr.append(_ports(spec["proto"], spec["port"]))
    target = {
        "family": "ip" if version == 4 else "ip6",
        "addr": spec["to_addr"],
        "port": spec.get("to_port") or spec["port"],
    }
    return [*expr, {"counter": None}, {"dnat": target}]


def snat_exprs(spec: Json) -> list[Json]:
    version = ipaddress.ip_network(spec["source"]).version
    expr = [_nfproto(version), *_addr_match(spec["source"], "saddr")]
    if spec.get("oif"):
        expr.append(_eq(_meta("oifname"), spec["oif"]))
    if spec.get("to_addr"):
        action: Json = {
            "snat": {"family": "ip" if version == 4 else "ip6", "addr": spec["to_addr"]}
        }
    else:
        action = {"masquerade": None}
    return [*expr, {"counter": None}, action]


# (record kind) -> (chain, expression builder)
CHAINS = {
    "rule": ("input", rule_exprs),
    "dnat": ("prerouting", dnat_exprs),
    "snat": ("postrouting", snat_exprs),
}
_CHAIN_DEFS = (
    {"name": "input", "type": "filter", "hook": "input", "prio": 0, "policy": "accept"},
    {"name": "prerouting", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"},
    {"name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
)


def build(instance: int, records: list[tuple[int, str, Json]]) -> list[Json]:
    """The commands that replace the node table with ``records`` ((id, kind, spec))."""
    table = {"family": FAMILY, "name": table_name(instance)}
    cmds: list[Json] = [{"add": {"table": table}}, {"delete": {"table": table}}]
    if not records:
        return cmds  # no record: no table (den leaves nothing behind)
    cmds.append({"add": {"table": table}})
    for chain in _CHAIN_DEFS:
        cmds.append({"add": {"chain": {"family": FAMILY, "table": table["name"], **chain}}})
    for rid, kind, spec in sorted(records):
        chain_name, exprs = CHAINS[kind]
        rule = {
            "family": FAMILY,
            "table": table["name"],
            "chain": chain_name,
            "comment": comment(rid),
            "expr": exprs(spec),
        }
        cmds.append({"add": {"rule": rule}})
    return cmds


def apply(instance: int, records: list[tuple[int, str, Json]]) -> None:
    run(build(instance, records))


def present(instance: int) -> dict[str, Json] | None:
    """The node table's rules by comment, with their counters; None: no table."""
    name = table_name(instance)
    rc, out, _err = nft().json_cmd(
        {"nftables": [{"list": {"table": {"family": FAMILY, "name": name}}}]}
    )
    if rc != 0:
        return None
    found: dict[str, Json] = {}
    for item in out.get("nftables", []) if isinstance(out, dict) else []:
        rule = item.get("rule")
        if rule and rule.get("comment"):
            found[rule["comment"]] = rule
    return found


def counters(rule: Json) -> Json:
    for e in rule.get("expr", []):
        if isinstance(e, dict) and "counter" in e and isinstance(e["counter"], dict):
            return {
                "packets": e["counter"].get("packets", 0),
                "bytes": e["counter"].get("bytes", 0),
            }
    return {"packets": 0, "bytes": 0}


def tables_view(items: list[Json], family: str | None, table: str | None) -> list[Json]:
    """Tables with their chains and rules, nested."""
    out: dict[tuple[str, str], Json] = {}
    for item in items:
        t = item.get("table")
        if (
            t
            and (family is None or t["family"] == family)
            and (table is None or t["name"] == table)
        ):
            out[(t["family"], t["name"])] = {
                "family": t["family"],
                "name": t["name"],
                "chains": {},
                "sets": [],
            }
    for item in items:
        for kind in ("chain", "rule", "set", "map"):
            obj = item.get(kind)
            if not obj:
                continue
            parent = out.get((obj.get("family", ""), obj.get("table", "")))
            if parent is None:
                continue
            if kind == "chain":
                parent["chains"][obj["name"]] = {
                    k: obj.get(k) for k in ("name", "type", "hook", "prio", "policy")
                } | {"rules": []}
            elif kind == "rule":
                chain = parent["chains"].setdefault(
                    obj["chain"], {"name": obj["chain"], "rules": []}
                )
                chain["rules"].append(
                    {
                        "handle": obj.get("handle"),
                        "comment": obj.get("comment"),
                        "expr": obj.get("expr", []),
                    }
                )
            else:
                parent["sets"].append(
                    {"name": obj.get("name"), "type": obj.get("type"), "kind": kind}
                )
    result = []
    for t in out.values():
        t["chains"] = list(t["chains"].values())
        result.append(t)
    return sorted(result, key=lambda t: (t["family"], t["name"]))


def table_names() -> list[tuple[str, str]]:
    out = run([{"list": {"tables": None}}])
    return sorted(
        (i["table"]["family"], i["table"]["name"]) for i in out.get("nftables", []) if "table" in i
    )


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
