"""The node's links, addresses, routes and neighbours, through netlink (pyroute2).

Every function blocks: call it from a worker thread (pyroute2's socket runs
an event loop of its own). Reads return plain JSON data; writes raise
BackendFailure with the kernel's reason.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyroute2 import Conntrack, IPRoute, NetlinkError
from pyroute2.netlink.rtnl.ndmsg import states

from den.errors import BackendFailure, Conflict, NotFound
from den.net.links import index

Json = dict[str, Any]
_FAMILIES = {socket.AF_INET: "ipv4", socket.AF_INET6: "ipv6"}
_NUD = {v: k for k, v in states.items()}
PROC_NET = Path("/proc/sys/net")
RESOLV_CONF = Path("/etc/resolv.conf")


@contextlib.contextmanager
def netlink() -> Iterator[IPRoute]:
    with IPRoute() as ipr:
        try:
            yield ipr
        except NetlinkError as exc:
            raise BackendFailure(
                f"the kernel refused: {exc.args[-1] if exc.args else exc}"
            ) from None


def _kind(link: Any) -> str:
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info else None
    if kind == "tun":
        data = info.get_attr("IFLA_INFO_DATA")
        return "tap" if data and data.get_attr("IFLA_TUN_TYPE") == 2 else "tun"
    if kind is None:
        return "loopback" if link.get_attr("IFLA_IFNAME") == "lo" else "device"
    return str(kind)


def _names(ipr: IPRoute) -> dict[int, str]:
    return {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


# Links, addresses and routes change whenever something on the node changes them.
_GROUPS = (
    0x1  # RTMGRP_LINK
    | 0x10  # RTMGRP_IPV4_IFADDR
    | 0x100  # RTMGRP_IPV6_IFADDR
    | 0x40  # RTMGRP_IPV4_ROUTE
    | 0x400  # RTMGRP_IPV6_ROUTE
)


class _Reads:
    """The answers of the dump reads (interfaces, routes), kept until the kernel
    says links, addresses or routes changed, and one netlink socket to ask again.

    pyroute2 takes milliseconds to decode a dump, more than ``ip`` takes as a
    whole process; a read that nothing changed since is answered from memory.
    The kernel queues its change notification on ``_watch`` before the call that
    made the change returns (whoever made it), so a read that drains the queue
    and finds nothing cannot miss a change; a full queue (ENOBUFS) counts as a
    change. Answers are shared: callers must not change them. Threads take turns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._watch: socket.socket | None = None
        self._ipr: IPRoute | None = None
        self._answers: dict[tuple[Any, ...], Any] = {}

    def _open(self) -> None:
        # Made in the thread that first reads: den's worker threads stay in the
        # daemon's network namespace (setns happens only in threads of its own).
        self.close()
        watch = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )
        watch.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        watch.bind((0, _GROUPS))
        # No multicast groups: this socket only answers our requests.
        self._watch, self._ipr, self._pid = watch, IPRoute(groups=0), os.getpid()

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._ipr is not None:
            self._ipr.close()
        self._watch, self._ipr = None, None
        self._answers.clear()

    def _changed(self) -> bool:
        assert self._watch is not None
        changed = False
        while True:
            try:
                self._watch.recv(65536)
            except BlockingIOError:
                return changed
            except OSError:  # ENOBUFS: notifications were dropped
                pass
            changed = True

    def get(self, key: tuple[Any, ...], fetch: Callable[[IPRoute], Any]) -> Any:
        with self._lock:
            if self._pid != os.getpid():  # first use, or a forked child
                self._open()
            elif self._changed():
                self._answers.clear()
            if key not in self._answers:
                assert self._ipr is not None
                try:
                    self._answers[key] = fetch(self._ipr)
                except NetlinkError as exc:
                    raise BackendFailure(
                        f"the kernel refused: {exc.args[-1] if exc.args else exc}"
                    ) from None
            return self._answers[key]


_reads = _Reads()


def _links_and_addrs(ipr: IPRoute) -> list[Json]:
    links = ipr.get_links()
    names = {int(x["index"]): str(x.get_attr("IFLA_IFNAME")) for x in links}
    addrs: dict[int, list[Json]] = {}
    for a in ipr.get_addr():
        addrs.setdefault(int(a["index"]), []).append(
            {
                "address": a.get_attr("IFA_ADDRESS"),
                "prefixlen": a["prefixlen"],
                "family": _FAMILIES.get(a["family"], str(a["family"])),
                "scope": a["scope"],
            }
        )
    out = []
    for link in links:
        master = link.get_attr("IFLA_MASTER")
        out.append(
            {
                "name": str(link.get_attr("IFLA_IFNAME")),
                "index": int(link["index"]),
                "kind": _kind(link),
                "state": str(link.get_attr("IFLA_OPERSTATE") or "UNKNOWN").lower(),
                "up": bool(link["flags"] & 1),
                "mtu": link.get_attr("IFLA_MTU"),
                "mac": link.get_attr("IFLA_ADDRESS"),
                "master": names.get(master) if master else None,
                "addresses": addrs.get(int(link["index"]), []),
            }
        )
    return out


def interfaces(name: str | None = None) -> list[Json]:
    """Every interface (or the one named), with its addresses; shared: do not change."""
    every: list[Json] = _reads.get(("interfaces",), _links_and_addrs)
    if name is None:
        return every
    out = [i for i in every if i["name"] == name]
    if not out:
        raise NotFound(f"no interface {name}")
    return out


def link_kind(name: str) -> str | None:
    with netlink() as ipr:
        idx = index(ipr, name)
        if idx is None:
            return None
        return _kind(ipr.link("get", index=idx)[0])


def master_of(name: str) -> str | None:
    with netlink() as ipr:
        idx = index(ipr, name)
        if idx is None:
            return None
        master = ipr.link("get", index=idx)[0].get_attr("IFLA_MASTER")
        return _names(ipr).get(master) if master else None


def _family_num(family: str | None) -> int:
    return {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}.get(family or "", socket.AF_UNSPEC)


def routes(family: str | None = None, table: int = 254) -> list[Json]:
    """The routes of one table; shared: do not change."""
    found: list[Json] = _reads.get(
        ("routes", family, table), lambda ipr: _routes(ipr, family, table)
    )
    return found


def _routes(ipr: IPRoute, family: str | None, table: int) -> list[Json]:
    found = ipr.get_routes(family=_family_num(family), table=table)
    # libc's list of names: no second dump for pyroute2 to decode
    names = dict(socket.if_nameindex())
    out = []
    for r in found:
        fam = _FAMILIES.get(r["family"], str(r["family"]))
        dst = r.get_attr("RTA_DST")
        oif = r.get_attr("RTA_OIF")
        out.append(
            {
                "dst": f"{dst}/{r['dst_len']}" if dst else "default",
                "family": fam,
                "gateway": r.get_attr("RTA_GATEWAY"),
                "dev": names.get(oif) if oif else None,
                "prefsrc": r.get_attr("RTA_PREFSRC"),
                "metric": r.get_attr("RTA_PRIORITY") or 0,
                "table": r.get_attr("RTA_TABLE") or r["table"],
                "protocol": r["proto"],
                "scope": r["scope"],
                "type": r["type"],
            }
        )
    return out


def resolve(name: str) -> tuple[int, str] | None:
    """(index, primary name) of the interface ``name`` names, or None.

    The kernel resolves a name through the interface's alternative names too
    (systemd gives every NIC one, e.g. enp0s3): checks and actions must use
    what this returns, never the name as given.
    """
    with netlink() as ipr:
        try:
            reply = ipr.link("get", ifname=name)
        except NetlinkError:
            return None
        if not reply:
            return None
        return int(reply[0]["index"]), str(reply[0].get_attr("IFLA_IFNAME"))


def topology() -> tuple[dict[int, Json], set[int]]:
    """Every link ({index: {name, master, parent}}; parent: a VLAN's or macvlan's lower
    device in this namespace) and the indexes main-table default routes leave through."""
    defaults: set[int] = set()
    with netlink() as ipr:
        found = {}
        for link in ipr.get_links():
            idx = int(link["index"])
            parent = link.get_attr("IFLA_LINK")
            if parent == idx or link.get_attr("IFLA_LINK_NETNSID") is not None:
                parent = None  # itself, or an index of another namespace
            found[idx] = {
                "name": str(link.get_attr("IFLA_IFNAME")),
                "master": link.get_attr("IFLA_MASTER") or None,
                "parent": parent or None,
            }
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_routes(family=fam, table=254):
                if r["dst_len"] != 0:
                    continue
                if r.get_attr("RTA_OIF"):
                    defaults.add(int(r.get_attr("RTA_OIF")))
                for nh in r.get_attr("RTA_MULTIPATH") or []:
                    if nh.get("oif"):
                        defaults.add(int(nh["oif"]))
    return found, {i for i in defaults if i in found}


def default_route_devs() -> set[str]:
    """The interfaces default routes (main table, either family) leave through."""
    found, defaults = topology()
    return {found[i]["name"] for i in defaults}


def route_dev(spec: Json) -> str | None:
    """The interface a route of ``spec`` would leave through (asked of the kernel)."""
    if spec.get("dev"):
        return str(spec["dev"])
    if not spec.get("gateway"):
        return None
    with netlink() as ipr:
        try:
            reply = ipr.route("get", dst=spec["gateway"])
        except NetlinkError:
            return None
        oif = reply[0].get_attr("RTA_OIF") if reply else None
        return _names(ipr).get(oif) if oif else None


def _route_args(ipr: IPRoute, spec: Json) -> Json:
    net = ipaddress.ip_network(spec["dst"])
    args: Json = {
        "dst": str(net.network_address),
        "dst_len": net.prefixlen,
        "family": socket.AF_INET if net.version == 4 else socket.AF_INET6,
        "table": spec.get("table", 254),
        "priority": spec.get("metric", 0),
    }
    if spec.get("gateway"):
        args["gateway"] = spec["gateway"]
    if spec.get("dev"):
        idx = index(ipr, spec["dev"])
        if idx is None:
            raise NotFound(f"no interface {spec['dev']}")
        args["oif"] = idx
    return args


def route_add(spec: Json) -> None:
    """Add a route; Conflict if the kernel has one with its key (table, dst, metric).

    Never a replace: a route den did not make (a bridge's connected route, the
    host's own) is not overwritten.
    """
    with netlink() as ipr:
        try:
            ipr.route("add", **_route_args(ipr, spec))
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                raise Conflict(
                    f"the kernel has a route {spec['dst']} (table {spec.get('table', 254)}, "
                    f"metric {spec.get('metric', 0)}) already; den does not replace it"
                ) from None
            raise


def route_delete(spec: Json) -> None:
    with netlink() as ipr:
        try:
            ipr.route("del", **_route_args(ipr, spec))
        except NetlinkError as exc:
            if exc.code == 3:  # ESRCH: no such route
                raise NotFound(f"no route {spec['dst']} like that") from None
            raise


def route_present(spec: Json) -> bool:
    net = ipaddress.ip_network(spec["dst"])
    for r in routes("ipv4" if net.version == 4 else "ipv6", spec.get("table", 254)):
        if r["dst"] == (str(net) if net.prefixlen else "default") and r["metric"] == spec.get(
            "metric", 0
        ):
            if spec.get("gateway") and r["gateway"] != spec["gateway"]:
                continue
            if spec.get("dev") and r["dev"] != spec["dev"]:
                continue
            return True
    return False


def neighbors(family: str | None = None) -> list[Json]:
    with netlink() as ipr:
        names = _names(ipr)
        found = ipr.get_neighbours(family=_family_num(family))
    return [
        {
            "dst": n.get_attr("NDA_DST"),
            "lladdr": n.get_attr("NDA_LLADDR"),
            "dev": names.get(n["ifindex"]),
            "family": _FAMILIES.get(n["family"], str(n["family"])),
            "state": _NUD.get(n["state"], str(n["state"])),
        }
        for n in found
        if n.get_attr("NDA_DST")
    ]


def bridges(name: str | None = None) -> list[Json]:
    links = interfaces()
    out = []
    for b in links:
        if b["kind"] != "bridge" or (name is not None and b["name"] != name):
            continue
        stp = _read(Path(f"/sys/class/net/{b['name']}/bridge/stp_state"))
        out.append(
            {
                "name": b["name"],
                "state": b["state"],
                "mtu": b["mtu"],
                "mac": b["mac"],
                "addresses": b["addresses"],
                "stp": stp == "1" if stp is not None else None,
                "ports": [
                    {"name": p["name"], "kind": p["kind"], "state": p["state"]}
                    for p in links
                    if p["master"] == b["name"]
                ],
            }
        )
    if name is not None and not out:
        raise NotFound(f"no bridge {name}")
    return out


def bridge_add(name: str, stp: bool, mtu: int | None) -> None:
    with netlink() as ipr:
        if index(ipr, name) is None:
            ipr.link("add", ifname=name, kind="bridge", br_stp_state=1 if stp else 0)
        idx = index(ipr, name)
        if idx is None:
            raise BackendFailure(f"cannot create the bridge {name}")
        args: Json = {"state": "up"}
        if mtu:
            args["mtu"] = mtu
        ipr.link("set", index=idx, **args)


def link_delete(name: str) -> bool:
    with netlink() as ipr:
        idx = index(ipr, name)
        if idx is None:
            return False
        ipr.link("del", index=idx)
        return True


def set_master(port: str, bridge: str | None) -> None:
    with netlink() as ipr:
        idx = index(ipr, port)
        if idx is None:
            raise NotFound(f"no interface {port}")
        if bridge is None:
            ipr.link("set", index=idx, master=0)
            return
        br = index(ipr, bridge)
        if br is None:
            raise NotFound(f"no bridge {bridge}")
        ipr.link("set", index=idx, master=br, state="up")


def veth_pair(a: str, b: str, bridge_a: str, bridge_b: str) -> None:
    """A veth pair joining two bridges (a on bridge_a, b on bridge_b)."""
    with netlink() as ipr:
        if index(ipr, a) is None:
            ipr.link("add", ifname=a, kind="veth", peer={"ifname": b})
    set_master(a, bridge_a)
    set_master(b, bridge_b)


def tap_create(spec: Json) -> None:
    with netlink() as ipr:
        if index(ipr, spec["name"]) is None:
            args: Json = {"ifname": spec["name"], "kind": "tuntap", "mode": "tap"}
            if spec.get("uid") is not None:
                args["uid"] = spec["uid"]
            ipr.link("add", **args)
        idx = index(ipr, spec["name"])
        if idx is None:
            raise BackendFailure(f"cannot create the tap {spec['name']}")
        opts: Json = {"state": "up"}
        if spec.get("mtu"):
            opts["mtu"] = spec["mtu"]
        if spec.get("mac"):
            opts["address"] = spec["mac"]
        ipr.link("set", index=idx, **opts)
    if spec.get("bridge"):
        set_master(spec["name"], spec["bridge"])


def link_exists(name: str) -> bool:
    with netlink() as ipr:
        return index(ipr, name) is not None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def sysctl() -> Json:
    """Forwarding, proxy_arp and proxy_ndp per interface (this process's netns)."""
    per: dict[str, Json] = {}
    for conf in sorted((PROC_NET / "ipv4" / "conf").iterdir()):
        per[conf.name] = {
            "ipv4_forwarding": _read(conf / "forwarding") == "1",
            "proxy_arp": _read(conf / "proxy_arp") == "1",
        }
    v6 = PROC_NET / "ipv6" / "conf"
    if v6.is_dir():
        for conf in sorted(v6.iterdir()):
            per.setdefault(conf.name, {})
            per[conf.name]["ipv6_forwarding"] = _read(conf / "forwarding") == "1"
            per[conf.name]["proxy_ndp"] = _read(conf / "proxy_ndp") == "1"
    return {
        "ip_forward": _read(PROC_NET / "ipv4" / "ip_forward") == "1",
        "interfaces": per,
    }


def dns() -> Json:
    servers, search, options = [], [], []
    try:
        lines = RESOLV_CONF.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or parts[0].startswith(("#", ";")):
            continue
        if parts[0] == "nameserver":
            servers.append(parts[1])
        elif parts[0] in ("search", "domain"):
            search += parts[1:]
        elif parts[0] == "options":
            options += parts[1:]
    return {
        "nameservers": servers,
        "search": search,
        "options": options,
        "source": str(RESOLV_CONF),
    }


def _tuple(t: Any) -> Json:
    return {
        "src": t.saddr,
        "dst": t.daddr,
        "proto": t.proto_name() if callable(getattr(t, "proto_name", None)) else t.proto,
        "sport": t.sport,
        "dport": t.dport,
    }


def conntrack(zone: int | None, limit: int) -> Json:
    out: list[Json] = []
    total = 0
    with Conntrack() as ct:
        for e in ct.dump_entries():
            if zone is not None and (e.zone or 0) != zone:
                continue
            total += 1
            if len(out) < limit:
                info = e.protoinfo
                out.append(
                    {
                        "orig": _tuple(e.tuple_orig),
                        "reply": _tuple(e.tuple_reply),
                        "zone": e.zone or 0,
                        "mark": e.mark,
                        "timeout": e.timeout,
                        "status": e.status,
                        "state": str(getattr(info, "state", "")) if info is not None else None,
                    }
                )
    return {"count": total, "entries": out, "truncated": total > len(out)}


def conntrack_stats() -> Json:
    with Conntrack() as ct:
        per_cpu = ct.stat()
        count = ct.count()
    totals: dict[str, int] = {}
    for cpu in per_cpu:
        for k, v in cpu.items():
            if k != "cpu" and isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    limit = _read(PROC_NET / "netfilter" / "nf_conntrack_max")
    return {
        "count": count,
        "max": int(limit) if limit else None,
        "totals": totals,
        "per_cpu": per_cpu,
    }


def conntrack_flush(zone: int | None) -> int:
    """Remove entries (of one zone, or all); how many there were."""
    with Conntrack() as ct:
        if zone is None:
            n = int(ct.count())
            ct.flush()
            return n
        n = 0
        for e in list(ct.dump_entries()):
            if (e.zone or 0) == zone:
                with contextlib.suppress(NetlinkError):
                    ct.entry("del", tuple_orig=e.tuple_orig, zone=zone)
                    n += 1
        return n
