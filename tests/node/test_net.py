"""net.*: the node API's networking, on a den daemon that runs in a network namespace of its own.

den's net.* methods act on the namespace den runs in: the daemon here runs in
a fresh netns the test makes (its unix socket is on the shared filesystem), so
the host's interfaces, routes and ruleset are never touched. The test sees the
kernel inside that netns through pyroute2 and nftables' JSON API.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import nftables
import pytest
from pyroute2 import IPRoute

from den.net import links
from tests.conftest import Daemon, dispose, make_base

T = TypeVar("T")
UPLINK = "uplink0"
LAN = "lan0"


def inside(ns: str, fn: Callable[[], T]) -> T:
    """fn() run in the test's netns."""
    out: list[T] = []
    links.in_netns(ns, lambda: out.append(fn()))
    return out[0]


def link(ns: str, name: str) -> dict[str, Any] | None:
    def get() -> dict[str, Any] | None:
        with IPRoute() as ipr:
            idx = links.index(ipr, name)
            if idx is None:
                return None
            msg = ipr.link("get", index=idx)[0]
            master = msg.get_attr("IFLA_MASTER")
            info = msg.get_attr("IFLA_LINKINFO")
            return {
                "kind": info.get_attr("IFLA_INFO_KIND") if info else None,
                "master": ipr.link("get", index=master)[0].get_attr("IFLA_IFNAME")
                if master
                else None,
                "up": bool(msg["flags"] & 1),
            }

    return inside(ns, get)


def routes(ns: str) -> list[tuple[str, str | None]]:
    def get() -> list[tuple[str, str | None]]:
        with IPRoute() as ipr:
            return [
                (f"{r.get_attr('RTA_DST')}/{r['dst_len']}", r.get_attr("RTA_GATEWAY"))
                for r in ipr.get_routes(family=2, table=254)
            ]

    return inside(ns, get)


def nft(ns: str, *cmds: dict[str, Any]) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        n = nftables.Nftables()
        n.set_json_output(True)
        rc, out, err = n.json_cmd({"nftables": list(cmds)})
        assert rc == 0, err
        return out if isinstance(out, dict) else {}

    return inside(ns, run)


def node_rules(ns: str, instance: int) -> dict[str, dict[str, Any]]:
    """den's node table's rules by comment ({} when the table is missing)."""

    def run() -> dict[str, dict[str, Any]]:
        n = nftables.Nftables()
        n.set_json_output(True)
        table = {"family": "inet", "name": f"den{instance}_node"}
        rc, out, _err = n.json_cmd({"nftables": [{"list": {"table": table}}]})
        if rc != 0:
            return {}
        return {
            i["rule"]["comment"]: i["rule"]
            for i in out["nftables"]
            if "rule" in i and "comment" in i["rule"]
        }

    return inside(ns, run)


def _setup_netns(ns: str) -> None:
    """lo up, an uplink with the default route, a LAN interface (veths: no dummy module here)."""
    with IPRoute() as ipr:
        lo = links.index(ipr, "lo")
        assert lo is not None
        ipr.link("set", index=lo, state="up")
        for name, addr in ((UPLINK, "192.0.2.1"), (LAN, "10.77.0.1")):
            _add_veth(name)
            idx = links.index(ipr, name)
            assert idx is not None
            ipr.addr("add", index=idx, address=addr, prefixlen=24)
        ipr.route("add", dst="0.0.0.0", dst_len=0, gateway="192.0.2.254")


@pytest.fixture(scope="module")
def netd() -> Iterator[tuple[Daemon, str]]:
    ns = f"dnt{secrets.token_hex(3)}"
    d = Daemon(make_base())
    try:
        links.create_netns(ns)
        links.in_netns(ns, lambda: _setup_netns(ns))
        d.wrap = ["nsenter", f"--net={links.NETNS_DIR / ns}"]
        d.start()
        yield d, ns
    finally:
        try:
            dispose(d)
        finally:
            # Everything den made in there goes with the namespace.
            links.delete_netns(ns)


def test_reads(netd: tuple[Daemon, str]) -> None:
    d, _ns = netd
    ifs = {i["name"]: i for i in d.call("net.interfaces")}
    assert {"lo", UPLINK, LAN} <= set(ifs)
    assert ifs[UPLINK]["addresses"][0]["address"] == "192.0.2.1"
    assert ifs[UPLINK]["mtu"] > 0 and ifs[UPLINK]["up"]
    assert any(r["dst"] == "default" and r["dev"] == UPLINK for r in d.call("net.routes"))
    st = d.call("net.status")
    assert st["default_route_devs"] == [UPLINK]
    assert "lo" in d.call("net.sysctl")["interfaces"]
    assert isinstance(d.call("net.neighbors"), list)
    assert "nameservers" in d.call("net.dns")
    assert d.call("net.conntrack.stats")["count"] >= 0
    assert d.call("net.conntrack", zone=0)["count"] >= 0
    assert d.call("net.health")["checks"]
    assert d.call("net.verify")["ok"]
    assert d.call("net.firewall")["node_table"] == f"inet den{d.instance}_node"


def test_conntrack_flush(netd: tuple[Daemon, str]) -> None:
    d, ns = netd
    table = {"family": "inet", "name": "dentest_ct"}
    at = {"family": "inet", "table": "dentest_ct"}
    # The kernel tracks a namespace's connections once a rule there looks at them.
    chain = {**at, "name": "out", "type": "filter", "hook": "output", "prio": 0}
    state = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new"]}}
    nft(ns, {"add": {"table": table}}, {"add": {"chain": {**chain, "policy": "accept"}}},
        {"add": {"rule": {**at, "chain": "out", "expr": [state, {"accept": None}]}}})  # fmt: skip
    try:
        port = 20000 + secrets.randbelow(10000)

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"x", ("127.0.0.1", port))

        def ours() -> list[dict[str, Any]]:
            found = d.call("net.conntrack", limit=100000)["entries"]
            return [e for e in found if e["orig"]["dport"] == port]

        inside(ns, send)
        assert ours(), "no conntrack entry for the datagram sent inside the namespace"
        assert d.call("net.conntrack.flush")["flushed"] >= 1
        assert not ours()
        assert d.call("net.conntrack.stats")["count"] == 0
    finally:
        nft(ns, {"delete": {"table": table}})


def test_bridge_taps_ports(netd: tuple[Daemon, str]) -> None:
    d, ns = netd
    try:
        d.call("net.bridge.add", name="nbr0")
        d.call("net.bridge.add", name="nbr1")
        d.call("net.vm.create_tap", name="ntap0", bridge="nbr0", mtu=1400)
        d.call("net.bridge.add_port", bridge="nbr0", port=LAN)
        con = d.call("net.bridge.connect", bridge="nbr0", peer="nbr1")
        assert link(ns, "nbr0") == {"kind": "bridge", "master": None, "up": True}
        assert link(ns, "ntap0") == {"kind": "tun", "master": "nbr0", "up": True}
        assert link(ns, LAN)["master"] == "nbr0"  # type: ignore[index]
        assert link(ns, con["spec"]["b"])["master"] == "nbr1"  # type: ignore[index]
        ports = {p["name"] for p in d.call("net.bridge", name="nbr0")[0]["ports"]}
        assert {"ntap0", LAN, con["spec"]["a"]} <= ports
        taps = {t["name"]: t for t in d.call("net.vm.list")}
        assert taps["ntap0"]["managed_by"] == "api" and taps["ntap0"]["bridge"] == "nbr0"
        assert d.call("net.verify")["ok"]

        d.call("net.bridge.remove_port", bridge="nbr0", port=LAN)
        assert link(ns, LAN)["master"] is None  # type: ignore[index]
        d.call("net.vm.delete_tap", name="ntap0")
        assert link(ns, "ntap0") is None
        d.call("net.bridge.delete", name="nbr1")
        assert link(ns, "nbr1") is None
        assert link(ns, con["spec"]["a"]) is None  # the connection went with it
        d.call("net.bridge.delete", name="nbr0")
        assert link(ns, "nbr0") is None
        assert d.call("net.verify") == {
            "ok": True,
            "records": 0,
            "drift": [],
            "unrecorded_rules": [],
        }
    finally:
        for name in ("ntap0", "nbr0", "nbr1"):
            with contextlib.suppress(Exception):
                d.call("net.vm.delete_tap" if name == "ntap0" else "net.bridge.delete", name=name)


def test_routes(netd: tuple[Daemon, str]) -> None:
    d, ns = netd
    d.call("net.routes.add", dst="198.51.100.0/24", gateway="10.77.0.254")
    try:
        assert ("198.51.100.0/24", "10.77.0.254") in routes(ns)
        assert any(r["dst"] == "198.51.100.0/24" for r in d.call("net.routes"))
    finally:
        d.call("net.routes.delete", dst="198.51.100.0/24", gateway="10.77.0.254")
    assert ("198.51.100.0/24", "10.77.0.254") not in routes(ns)
    assert d.error("net.routes.delete", dst="198.51.100.0/24", dev=LAN).code == -32001


def test_reads_follow_changes_behind_dens_back(netd: tuple[Daemon, str]) -> None:
    """net.interfaces and net.routes remember their answer until the kernel reports a
    change: one made by someone else shows on the very next read."""
    d, ns = netd

    def names() -> set[str]:
        return {i["name"] for i in d.call("net.interfaces")}

    def dsts() -> set[str]:
        return {r["dst"] for r in d.call("net.routes", family="ipv4")}

    assert "xtr0" not in names() and "203.0.113.0/24" not in dsts()

    def add() -> None:
        _add_veth("xtr0")
        with IPRoute() as ipr:
            ipr.addr("add", index=links.index(ipr, "xtr0"), address="203.0.113.1", prefixlen=24)

    def delete() -> None:
        with IPRoute() as ipr:
            ipr.link("del", index=links.index(ipr, "xtr0"))

    inside(ns, add)
    try:
        assert "xtr0" in names() and "203.0.113.0/24" in dsts()
        mine = d.call("net.interfaces", name="xtr0")[0]
        assert mine["addresses"][0]["address"] == "203.0.113.1"
    finally:
        inside(ns, delete)
    assert "xtr0" not in names() and "203.0.113.0/24" not in dsts()


def test_firewall_nat_verify_restore(netd: tuple[Daemon, str]) -> None:
    d, ns = netd
    inst = d.instance
    made: list[tuple[str, int]] = []
    try:
        rule = d.call("net.firewall.add_rule", proto="tcp", port=8080, source="10.77.0.0/24")
        made.append(("net.firewall.remove_rule", rule["id"]))
        dnat = d.call("net.nat.add_dnat", port=2222, to_addr="10.77.0.9", to_port=22)
        made.append(("net.nat.remove_dnat", dnat["id"]))
        snat = d.call("net.nat.add_snat", source="10.77.0.0/24", oif=UPLINK)
        made.append(("net.nat.remove_snat", snat["id"]))
        tap = d.call("net.vm.create_tap", name="ntap9")
        inside(ns, lambda: _add_veth("gone0"))
        d.call("net.bridge.add", name="nbr5")
        port = d.call("net.bridge.add_port", bridge="nbr5", port="gone0")
        rules = node_rules(ns, inst)
        assert {f"den:{rule['id']}", f"den:{dnat['id']}", f"den:{snat['id']}"} == set(rules)
        exprs = json.dumps(rules[f"den:{dnat['id']}"]["expr"])
        assert '"dnat"' in exprs and "10.77.0.9" in exprs
        assert '"masquerade"' in json.dumps(rules[f"den:{snat['id']}"]["expr"])
        nat = d.call("net.nat.status")
        assert nat["dnat"][0]["present"] and nat["snat"][0]["present"]
        assert d.call("net.verify")["ok"]

        # A rule and the tap deleted behind den's back: drift...
        handle = rules[f"den:{rule['id']}"]["handle"]
        table = {"family": "inet", "table": f"den{inst}_node", "chain": "input"}
        nft(ns, {"delete": {"rule": {**table, "handle": handle}}})
        inside(ns, lambda: links.delete_link("ntap9"))
        # ... and a port whose interface vanished.
        inside(ns, lambda: links.delete_link("gone0"))
        drift = d.call("net.verify")
        assert not drift["ok"]
        assert {x["id"] for x in drift["drift"]} == {rule["id"], tap["id"], port["id"]}
        # Put back when den starts again; the port, which cannot come back, pruned.
        d.restart()
        assert f"den:{rule['id']}" in node_rules(ns, inst)
        assert link(ns, "ntap9") is not None
        assert d.call("net.verify")["ok"]
        c = d.client()
        try:
            events = c.call("audit.list", {"method": "net.prune"})
        finally:
            c.close()
        assert [e["target"] for e in _items(events)] == [f"port:{port['id']}"]

        for meth, rid in made:
            d.call(meth, id=rid)
        made.clear()
        assert node_rules(ns, inst) == {}
    finally:
        for meth, rid in made:
            with contextlib.suppress(Exception):
                d.call(meth, id=rid)
        with contextlib.suppress(Exception):
            d.call("net.vm.delete_tap", name="ntap9")
        with contextlib.suppress(Exception):
            d.call("net.bridge.delete", name="nbr5")
        inside(ns, lambda: links.delete_link("gone0"))


def _items(result: Any) -> list[dict[str, Any]]:
    return list(result["events"] if isinstance(result, dict) else result)


def _add_veth(name: str) -> None:
    """``name`` up, with its peer ``name``p up (so that it has a carrier)."""
    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": f"{name}p"})
        for n in (name, f"{name}p"):
            ipr.link("set", index=links.index(ipr, n), state="up")


@pytest.mark.parametrize(
    ("method", "params", "obj"),
    [
        ("net.bridge.delete", {"name": "den{i}"}, "den{i}"),
        ("net.bridge.add", {"name": "den{i}"}, "den{i}"),
        ("net.bridge.add_port", {"bridge": "nbrx", "port": "d{i}-abc"}, "d{i}-abc"),
        ("net.bridge.add_port", {"bridge": "nbrx", "port": UPLINK}, UPLINK),
        ("net.bridge.add_port", {"bridge": "nbrx", "port": "lo"}, "lo"),
        ("net.vm.delete_tap", {"name": "den{i}t1"}, "den{i}t1"),
        ("net.vm.create_tap", {"name": "den{i}x"}, "den{i}x"),
        ("net.routes.add", {"dst": "203.0.113.0/24", "dev": UPLINK}, UPLINK),
        ("net.routes.delete", {"dst": "0.0.0.0/0", "gateway": "192.0.2.254"}, "default route"),
        ("net.nat.add_dnat", {"port": 80, "to_addr": "10.0.0.2", "iface": "den{i}"}, "den{i}"),
    ],
)
def test_protected(netd: tuple[Daemon, str], method: str, params: dict[str, Any], obj: str) -> None:
    d, _ns = netd
    i = d.instance
    p = {k: v.format(i=i) if isinstance(v, str) else v for k, v in params.items()}
    before = d.call("net.interfaces"), d.call("net.routes")
    err = d.error(method, **p)
    assert err.code == -32003, err
    assert obj.format(i=i) in err.message
    assert (d.call("net.interfaces"), d.call("net.routes")) == before


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("net.bridge.add", {"name": "a/b"}),
        ("net.bridge.add", {"name": "a b"}),
        ("net.bridge.add", {"name": "x" * 16}),
        ("net.bridge.add", {"name": "x" * 200}),
        ("net.vm.create_tap", {"name": "../etc"}),
        ("net.routes.add", {"dst": "10.0.0.0/33", "dev": LAN}),
        ("net.routes.add", {"dst": "10.0.0.1/24", "dev": LAN}),
        ("net.routes.add", {"dst": "300.0.0.0/8", "dev": LAN}),
        ("net.routes.add", {"dst": "2001:db8::/129", "dev": LAN}),
        ("net.routes.add", {"dst": "10.9.0.0/24", "gateway": "2001:db8::1"}),
        ("net.routes", {"family": "ipx"}),
        ("net.firewall.add_rule", {"family": "ipx", "port": 22}),
        ("net.firewall.add_rule", {"source": "10.0.0.0/40"}),
        ("net.firewall.add_rule", {"port": 70000}),
        ("net.nat.add_snat", {"source": "10.0.0.0/8", "oif": "eth0;rm"}),
        ("net.nat.add_dnat", {"port": 80, "to_addr": "10.0.0.300"}),
        # Rules den did not make are not the API's: remove_rule takes a record id only.
        (
            "net.firewall.remove_rule",
            {"family": "inet", "table": "filter", "chain": "input", "handle": 1},
        ),
    ],
)
def test_hostile_params(netd: tuple[Daemon, str], method: str, params: dict[str, Any]) -> None:
    d, _ns = netd
    before = d.call("net.interfaces"), d.call("net.routes"), d.call("net.verify")
    assert d.error(method, **params).code == -32602
    assert (d.call("net.interfaces"), d.call("net.routes"), d.call("net.verify")) == before
