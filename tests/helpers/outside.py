"""A host "outside" this machine: a network namespace of the test's own, joined to
the host by a veth pair on a free 198.18.x.0/24 (a benchmarking range nothing
routes), where a test runs a server that workspaces reach through den's NAT.
Everything it makes is removed on exit, even when the test fails.

``extra`` addresses (a stand-in LAN host at a private address, a stand-in
metadata service at 169.254.169.254) are put on the outside host too, routed
to it only for packets from ``routed_from`` (a den subnet) by a policy rule
of the test's own: the host's own routes to those addresses stay as they were.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_third_octet() -> int:
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for _ in range(100):
        third = random.randint(1, 254)
        if f"198.18.{third}." not in routes:
            return third
    raise RuntimeError("no free 198.18.x.0/24")


@dataclass
class OutsideHost:
    ns: str
    host_if: str
    address: str  # of the outside host
    host_address: str  # the host's own address on the link
    peer_if: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Run ``argv`` in the outside host, output to ``log``; stopped on exit."""
        with open(log, "wb") as out:
            p = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *argv], stdout=out, stderr=subprocess.STDOUT
            )
        self.procs.append(p)
        return p


@contextlib.contextmanager
def outside_host(extra: tuple[str, ...] = (), routed_from: str = "") -> Iterator[OutsideHost]:
    tag = secrets.token_hex(2)
    ns, host_if, peer_if = f"dtnet{tag}", f"dth{tag}", f"dtp{tag}"
    third = _free_third_octet()
    host_ip, srv_ip = f"198.18.{third}.1", f"198.18.{third}.2"
    host = OutsideHost(ns, host_if, srv_ip, host_ip, peer_if)
    table = str(random.randint(100_000, 2_000_000))
    assert not extra or routed_from, "extra addresses are routed for one den subnet"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _ip("link", "set", peer_if, "netns", ns)
        _ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{srv_ip}/24", "dev", peer_if)
        _ip("-n", ns, "link", "set", peer_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", host_ip)
        for addr in extra:
            _ip("-n", ns, "addr", "add", f"{addr}/32", "dev", peer_if)
            _ip("route", "add", f"{addr}/32", "dev", host_if, "table", table)
        if extra:
            _ip("rule", "add", "from", routed_from, "lookup", table, "priority", "100")
        yield host
    finally:
        if extra:
            subprocess.run(
                ["ip", "rule", "del", "from", routed_from, "lookup", table, "priority", "100"],
                capture_output=True,
                check=False,
            )
            subprocess.run(
                ["ip", "route", "flush", "table", table], capture_output=True, check=False
            )
        for p in host.procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
    assert not Path("/sys/class/net", host_if).exists()
    assert not Path("/var/run/netns", ns).exists()
