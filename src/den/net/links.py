"""Bridge, network namespaces and veth pairs, through netlink (pyroute2)."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import threading
from collections.abc import Callable
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, states

from den.errors import BackendFailure

NETNS_DIR = Path("/var/run/netns")
_CLONE_NEWNET = 0x40000000
_MS_BIND = 4096
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)

# Network namespaces are made and entered from short-lived threads with
# unshare(2)/setns(2): forking helpers (as pyroute2's NetNS does) would hand
# their signals to the daemon's event loop.


def index(ipr: IPRoute, name: str) -> int | None:
    """The interface index of ``name``, asked of the kernel by name.

    (pyroute2's link_lookup dumps every link: slow with hundreds of veths.)
    """
    try:
        reply = ipr.link("get", ifname=name)
    except NetlinkError:
        return None
    return int(reply[0]["index"]) if reply else None


def ensure_bridge(name: str, gateway_cidr: str) -> int:
    """Create the bridge with the gateway address if missing; return its index."""
    addr, plen = gateway_cidr.split("/")
    with IPRoute() as ipr:
        idx = index(ipr, name)
        if idx is None:
            with contextlib.suppress(NetlinkError):
                ipr.link("add", ifname=name, kind="bridge")
            idx = index(ipr, name)
        if idx is None:
            raise BackendFailure(f"cannot create the bridge {name}")
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx, family=2)}
        if addr not in have:
            ipr.addr("add", index=idx, address=addr, prefixlen=int(plen))
        ipr.link("set", index=idx, state="up")
        return idx


def delete_link(name: str) -> None:
    with IPRoute() as ipr:
        idx = index(ipr, name)
        if idx is not None:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=idx)


def link_names(prefix: str) -> list[str]:
    with IPRoute() as ipr:
        names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return sorted(n for n in names if n and n.startswith(prefix))


def link_exists(name: str) -> bool:
    with IPRoute() as ipr:
        return index(ipr, name) is not None


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def netns_names(prefix: str) -> list[str]:
    if not NETNS_DIR.exists():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def _in_thread(name: str, fn: Callable[[], None]) -> None:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            errors.append(exc)

    t = threading.Thread(target=target, name=f"netns-{name}")
    t.start()
    t.join()
    if errors:
        raise BackendFailure(f"cannot set up network namespace {name}: {errors[0]}")


def _enter(name: str) -> None:
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def in_netns(name: str, fn: Callable[[], None]) -> None:
    """Run ``fn()`` in a fresh thread that has joined the netns ``name``."""

    def run() -> None:
        _enter(name)
        fn()

    _in_thread(name, run)


def _sysctls() -> None:
    # Root in the workspace has no capabilities over this namespace (it belongs
    # to the host's user namespace), so it could not bind ports below 1024 or
    # ping: allow both for everyone inside.
    Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").write_text("0")
    Path("/proc/sys/net/ipv4/ping_group_range").write_text("0 2147483647")


def create_netns(name: str) -> None:
    """A named network namespace at /var/run/netns/NAME (like `ip netns add`)."""
    if not netns_exists(name):
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
        target = NETNS_DIR / name
        target.touch()

        def make() -> None:
            if _libc.unshare(_CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            if _libc.mount(src, str(target).encode(), None, _MS_BIND, None) != 0:
                raise OSError(ctypes.get_errno(), "mount")

        try:
            _in_thread(name, make)
        except BackendFailure:
            target.unlink(missing_ok=True)
            raise
    in_netns(name, _sysctls)


def delete_netns(name: str) -> None:
    target = NETNS_DIR / name
    if target.exists():
        _libc.umount2(str(target).encode(), _MNT_DETACH)
        with contextlib.suppress(OSError):
            target.unlink()


def workspace_mac(address: str) -> str:
    """The MAC of a workspace's eth0: locally administered, made of its address.

    Known before the workspace runs, so the host can pin it; unique on the
    bridge because the addresses are.
    """
    return "02:de:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


def attach(ns: str, host_if: str, bridge: str, address: str, prefixlen: int, gateway: str) -> None:
    """A veth pair: ``host_if`` on the bridge (isolated port), eth0 in ``ns``.

    A workspace cannot send ARP of its own or change its MAC or address: the
    host's user namespace owns the netns, so its root's capabilities do not
    reach it, and seccomp refuses packet and raw sockets. Should both walls
    fall, the host still trusts neither ARP nor source MACs for workspace
    addresses (Caddy and den connect to them): its neighbour entry of
    ``address`` is permanent (ARP never changes it) and names den's MAC for
    it, and the bridge sends that MAC to this port only (a static FDB entry,
    no learning on the port, no flooding of unknown unicast to it). A
    workspace that claims another's address or MAC is not heard; one that
    changes its own MAC cuts itself off.
    """
    mac = workspace_mac(address)
    with IPRoute() as ipr:
        br = index(ipr, bridge)
        if br is None:
            raise BackendFailure(f"bridge {bridge} is missing")
        idx = index(ipr, host_if)
        if idx is None:
            ipr.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
            idx = index(ipr, host_if)
        if idx is None:
            raise BackendFailure(f"cannot create the veth {host_if}")
        # The alias names the address on the host side, where detach reads it.
        ipr.link("set", index=idx, master=br, state="up", ifalias=address)
        # Isolated bridge ports cannot reach each other: no workspace-to-workspace traffic.
        ipr.brport("set", index=idx, isolated=1, learning=0, unicast_flood=0)
        ipr.fdb("replace", ifindex=idx, lladdr=mac, flags=NTF_MASTER, state=states["noarp"])
        ipr.neigh("replace", ifindex=br, dst=address, lladdr=mac, state=states["permanent"])

    def inside() -> None:
        with IPRoute() as nsr:
            eth = index(nsr, "eth0")
            lo = index(nsr, "lo")
            if eth is None or lo is None:
                raise BackendFailure(f"eth0 is missing in {ns}")
            have = {a.get_attr("IFA_ADDRESS") for a in nsr.get_addr(index=eth, family=2)}
            if address not in have:
                nsr.addr("add", index=eth, address=address, prefixlen=prefixlen)
            nsr.link("set", index=eth, address=mac, state="up")
            nsr.link("set", index=lo, state="up")
            with contextlib.suppress(NetlinkError):
                nsr.route("add", gateway=gateway)

    in_netns(ns, inside)


def detach(host_if: str, bridge: str) -> None:
    """Remove the veth pair and the host's neighbour entry of its address."""
    with IPRoute() as ipr:
        idx = index(ipr, host_if)
        if idx is None:
            return
        alias = ipr.link("get", index=idx)[0].get_attr("IFLA_IFALIAS")
        with contextlib.suppress(NetlinkError):
            ipr.link("del", index=idx)
        br = index(ipr, bridge)
        if alias and br is not None:
            # The address may go to another workspace: until then nobody owns it.
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", ifindex=br, dst=alias)


def counters(host_if: str) -> tuple[int, int]:
    """(rx, tx) bytes as the workspace sees them (the host side counts the reverse)."""
    base = f"/sys/class/net/{host_if}/statistics/"
    try:
        with open(base + "tx_bytes") as f:
            tx_host = int(f.read())
        with open(base + "rx_bytes") as f:
            rx_host = int(f.read())
    except (OSError, ValueError):
        return 0, 0
    return tx_host, rx_host
