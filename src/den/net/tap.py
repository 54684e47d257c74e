"""A microVM's TAP on den's bridge, and the bridge-level anti-spoofing table.

A container cannot forge its MAC or IPv4 source (the host's user namespace
owns its netns, seccomp refuses packet sockets); a guest kernel can do both.
So besides the isolated bridge port, the permanent neighbour entry and the
static FDB entry that veths get (den.net.links.attach), each TAP passes only
frames whose source MAC is its own and whose IPv4 or ARP sender address is
its own, in a ``bridge`` family table ``den<N>_vm``; everything else from a
TAP (IPv6, other ethertypes, forged sources) is dropped before the bridge
sees it. The ``inet den<N>`` rules match the bridge and apply unchanged.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, states

from den.errors import BackendFailure
from den.net import firewall, links, names

_lock = threading.Lock()


def table(instance: int) -> str:
    return f"den{instance}_vm"


def ruleset(instance: int) -> str:
    t, prefix = table(instance), names.tap(instance, "")
    return f"""table bridge {t} {{
    set macs {{ type ifname . ether_addr; }}
    set ips {{ type ifname . ipv4_addr; }}
    chain in {{
        type filter hook prerouting priority -200; policy accept;
        iifname != "{prefix}*" accept
        iifname . ether saddr != @macs drop
        ether type != {{ ip, arp }} drop
        ether type ip iifname . ip saddr != @ips drop
        ether type arp iifname . arp saddr ip != @ips drop
        ether type arp iifname . arp saddr ether != @macs drop
    }}
}}
"""


def ensure_table(instance: int) -> None:
    """The anti-spoofing table in place (made once; its elements are per TAP)."""
    with _lock:
        rc, _out, _err = firewall.nft().cmd(f"list table bridge {table(instance)}")
        if rc != 0:
            firewall.run(ruleset(instance))


def remove_table(instance: int) -> None:
    with _lock:
        firewall.nft().cmd(f"delete table bridge {table(instance)}")


def _elements(tap: str, mac: str, address: str) -> tuple[str, str]:
    return f'"{tap}" . {mac}', f'"{tap}" . {address}'


def owner(tap: str) -> int | None:
    """The uid a persistent TAP belongs to (None: anyone with CAP_NET_ADMIN)."""
    try:
        uid = int(Path(f"/sys/class/net/{tap}/owner").read_text())
    except (OSError, ValueError):
        return None
    return None if uid < 0 else uid


def attach(instance: int, tap: str, bridge: str, mac: str, address: str, uid: int) -> None:
    """A persistent TAP ``tap`` owned by ``uid`` (the unprivileged QEMU opens it by
    name) as an isolated port of ``bridge`` that only ``mac``/``address`` may send
    from. Idempotent; a TAP of another owner is made again (its QEMU is gone)."""
    ensure_table(instance)
    with IPRoute() as ipr:
        br = links.index(ipr, bridge)
        if br is None:
            raise BackendFailure(f"bridge {bridge} is missing")
        idx = links.index(ipr, tap)
        if idx is not None and owner(tap) != uid:
            ipr.link("del", index=idx)
            idx = None
        if idx is None:
            with contextlib.suppress(NetlinkError):
                ipr.link("add", ifname=tap, kind="tuntap", mode="tap", uid=uid, gid=uid)
            idx = links.index(ipr, tap)
        if idx is None:
            raise BackendFailure(f"cannot create the tap {tap}")
        # The alias names the address on the host side, where links.detach reads it.
        ipr.link("set", index=idx, master=br, state="up", ifalias=address)
        ipr.brport("set", index=idx, isolated=1, learning=0, unicast_flood=0)
        ipr.fdb("replace", ifindex=idx, lladdr=mac, flags=NTF_MASTER, state=states["noarp"])
        ipr.neigh("replace", ifindex=br, dst=address, lladdr=mac, state=states["permanent"])
    m, a = _elements(tap, mac, address)
    t = f"bridge {table(instance)}"
    firewall.run(f"add element {t} macs {{ {m} }}\nadd element {t} ips {{ {a} }}")


def detach(instance: int, tap: str, bridge: str) -> None:
    """Remove the TAP, its neighbour entry and its anti-spoofing elements. Idempotent."""
    links.detach(tap, bridge)
    forget(instance, tap)


def forget(instance: int, tap: str) -> None:
    """Drop every anti-spoofing element of ``tap`` (what a TAP that is gone left)."""
    nft = firewall.nft()
    t = f"bridge {table(instance)}"
    for name in ("macs", "ips"):
        rc, out, _err = nft.cmd(f"list set {t} {name}")
        if rc != 0:
            continue
        for elem in _set_elements(out):
            if elem[0] == tap:
                nft.cmd(f'delete element {t} {name} {{ "{tap}" . {elem[1]} }}')


def _set_elements(out: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for item in json.loads(out or "{}").get("nftables", []):
        s = item.get("set")
        for e in (s or {}).get("elem", []):
            parts = e.get("concat") if isinstance(e, dict) else None
            if isinstance(parts, list) and len(parts) == 2:
                found.append((str(parts[0]), str(parts[1])))
    return found


def taps(instance: int) -> list[str]:
    """Names of this instance's TAPs on the host."""
    return links.link_names(names.tap(instance, ""))


def counters(tap: str) -> tuple[int, int]:
    """(rx, tx) bytes as the guest sees them."""
    return links.counters(tap)
