"""Egress policy, tried from real workspaces against hosts in network namespaces
the test makes (nothing leaves this machine).

The outside host stands in for everything beyond the host: its own address on
198.18.x.0/24 is "the internet" (a benchmarking range assigned to no network,
which den's policy leaves open, as it does the documentation ranges this
machine's simulated internet uses), and it also answers at a private address
(the stand-in LAN host) and at 169.254.169.254 (the stand-in cloud metadata
service), so that any packet let through would get its reply.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from den.cli.client import RpcError
from den.net.network import host_resolvers4
from tests.conftest import Daemon
from tests.helpers.outside import OutsideHost, outside_host
from tests.workspaces.conftest import Users, assert_gone, create, invalid, make_users, ok, sh
from tests.workspaces.test_isolation import Listener

# A cloud's link-local metadata service on the LAN (169.254.170.2: a container
# platform's credentials endpoint). Not 169.254.169.254: inside a workspace
# that is den's own metadata service, which never leaves its namespace.
METADATA = "169.254.170.2"


@dataclass
class World:
    host: OutsideHost
    lan: str  # the stand-in LAN host's private address
    port: int
    token: str
    log: Path

    def url(self, address: str) -> str:
        return f"http://{address}:{self.port}/"

    @property
    def public(self) -> str:
        return self.host.address


# Fetch a URL within 3 s (exit 0) or fail, from wherever it runs.
FETCH = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3).close()"


def subnet_of(address: str) -> str:
    a, b, _, _ = address.split(".")
    return f"{a}.{b}.0.0/16"


@contextlib.contextmanager
def world(subnet: str) -> Iterator[World]:
    """An HTTP server on the outside host answering on all its addresses."""
    lan = f"192.168.{random.randint(1, 254)}.{random.randint(2, 254)}"
    port = random.randint(20000, 30000)
    docroot = Path(tempfile.mkdtemp(prefix="den-egress-"))
    token = secrets.token_hex(8)
    (docroot / "index.html").write_text(token + "\n")
    log = docroot / "server.log"
    try:
        with outside_host(extra=(lan, METADATA), routed_from=subnet) as host:
            argv = ["/usr/bin/python3", "-m", "http.server", "--bind", "::"]  # IPv4 too
            server = host.start([*argv, "--directory", str(docroot), str(port)], log)
            url = f"http://{host.address}:{port}/"
            deadline = time.monotonic() + 15
            while True:
                try:
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        assert resp.read().decode().strip() == token
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.1)
            yield World(host, lan, port, token, log)
    finally:
        shutil.rmtree(docroot, ignore_errors=True)


def reaches(d: Daemon, ref: str, w: World, address: str) -> bool:
    res = sh(d, ref, f"timeout 4 wget -qO- {w.url(address)}")
    return res["exit_code"] == 0 and w.token in res["stdout"]


def none_reach(d: Daemon, refs: list[str], w: World, address: str) -> bool:
    """No workspace of ``refs`` reaches ``address``: asked of all at once (a closed
    destination drops the connection, so each probe waits its whole timeout)."""
    with ThreadPoolExecutor(len(refs)) as pool:
        return not any(pool.map(lambda ref: reaches(d, ref, w, address), refs))


def reached(d: Daemon, ref: str, w: World, address: str) -> bool:
    """``reaches``, for what must be reached: busybox's wget now and then dies of
    a segfault of its own on a connection that works (seen in the kernel log,
    with the next try through), so a positive check gets three tries."""
    return any(reaches(d, ref, w, address) for _ in range(3))


def requests_seen(w: World) -> int:
    return w.log.read_text().count('"GET / ')


def nft_table(d: Daemon) -> str:
    return subprocess.run(
        ["nft", "list", "table", "inet", f"den{d.instance}"], capture_output=True, text=True
    ).stdout


def test_default_policy_closes_lan_metadata_and_host(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    ws = create(d, users.make(), "pol")
    ref = ws["ref"]
    try:
        with world(subnet_of(ws["address"])) as w:
            # positive control: "the internet" answers
            assert reached(d, ref, w, w.public)
            # and the host's resolver answers, even in a private range (10.x here)
            if any(ipaddress.IPv4Address(r).is_private for r in host_resolvers4()):
                res = sh(d, ref, "timeout 5 nslookup deb.debian.org")
                assert res["exit_code"] == 0 and "timed out" not in res["stdout"], res
            seen = requests_seen(w)
            # the stand-in LAN host at a private address: closed
            assert not reaches(d, ref, w, w.lan)
            # the stand-in metadata service: closed
            assert not reaches(d, ref, w, METADATA)
            assert requests_seen(w) == seen, w.log.read_text()
            # the host's own address on the outside link, in a range the policy leaves
            # open: still only den's listeners answer there
            listener = Listener()
            try:
                res = sh(d, ref, f"nc -w 3 {w.host.host_address} {listener.port} </dev/null")
                assert "host" not in res["stdout"] and listener.accepted == 0, res
            finally:
                listener.close()
            # the drops were den's: the blocked set counted them (probed again just
            # before reading: the reconciler's pass re-applies the table, which
            # starts its counters from zero)
            # (a pass may still land between the probe and the reading: a few tries).
            for _ in range(3):
                assert not reaches(d, ref, w, w.lan)
                table = nft_table(d)
                m = re.search(r"ip daddr @blocked counter packets (\d+)", table)
                if m and int(m.group(1)) > 0:
                    break
            assert m and int(m.group(1)) > 0, table
    finally:
        d.call("workspace.delete", ref=ref)
    assert_gone(d, ws["id"])


def test_ping_without_raw_sockets(pool_daemon: Daemon, dev_image: str, users: Users) -> None:
    """iputils ping works through ICMP datagram sockets (ping_group_range of the
    workspace's netns), not raw ones; the policy applies to it as to TCP."""
    d = pool_daemon
    ws = create(d, users.make(), "ping", image=dev_image)
    ref = ws["ref"]
    try:
        # Debian's ping carries the file capability cap_net_raw, which the
        # sandbox does not grant: a copy without it uses an ICMP datagram socket.
        ok(d, ref, "cp /usr/bin/ping /tmp/ping")
        with world(subnet_of(ws["address"])) as w:
            out = ok(d, ref, f"/tmp/ping -c 1 -W 3 {w.public}")
            assert "1 received" in out, out
            for closed in (w.lan, METADATA):
                res = sh(d, ref, f"/tmp/ping -c 1 -W 2 {closed}")
                assert res["exit_code"] != 0 and "1 received" not in res["stdout"], res
        netns = f"/var/run/netns/den{d.instance}-{ws['id']}"
        res = subprocess.run(
            ["nsenter", f"--net={netns}", "sysctl", "-n", "net.ipv4.ping_group_range"],
            capture_output=True,
            text=True,
        )
        assert res.stdout.split() == ["0", "2147483647"], res
    finally:
        d.call("workspace.delete", ref=ref)
    assert_gone(d, ws["id"])


def test_admin_opens_a_destination_per_user_and_per_workspace(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    alice, bob = users.make(), users.make()
    a1 = create(d, alice, "one")
    a2 = create(d, alice, "two")
    b1 = create(d, bob, "one")
    rules: list[int] = []
    try:
        with world(subnet_of(a1["address"])) as w:
            assert none_reach(d, [a1["ref"], a2["ref"], b1["ref"]], w, w.lan)
            # for a user: both of alice's workspaces, not bob's
            r = d.call("egress.allow", dest=w.lan, user=alice, note="alice's LAN box")
            rules.append(r["id"])
            assert r["scope"] == f"user:{alice}" and r["dest"] == f"{w.lan}/32"
            assert reached(d, a1["ref"], w, w.lan)
            assert reached(d, a2["ref"], w, w.lan)
            assert not reaches(d, b1["ref"], w, w.lan)
            # a workspace alice makes now has it at once
            a3 = create(d, alice, "three")
            assert reached(d, a3["ref"], w, w.lan)
            listed = d.call("egress.list")
            assert any(x["id"] == r["id"] and x["note"] == "alice's LAN box" for x in listed)
            # removed: closed again for all of them
            d.call("egress.remove", id=r["id"])
            rules.remove(r["id"])
            assert none_reach(d, [a1["ref"], a2["ref"], a3["ref"]], w, w.lan)
            # for one workspace, one TCP port, through the CLI
            res = d.cli(
                "egress", "allow", w.lan, "--workspace", f"{alice}/one",
                "--port", str(w.port), "--proto", "tcp", "--json", check=True,
            )  # fmt: skip
            assert '"scope": "workspace:' in res.stdout, res.stdout
            rid = next(x["id"] for x in d.call("egress.list") if x["dest"] == f"{w.lan}/32")
            rules.append(rid)
            assert reached(d, a1["ref"], w, w.lan)
            assert none_reach(d, [a2["ref"], b1["ref"]], w, w.lan)
            # only that port: the metadata address stays closed for it too
            assert not reaches(d, a1["ref"], w, METADATA)
            out = d.cli("egress", "ls", "--json", check=True).stdout
            assert f'"workspace:{alice}/one"' in out, out
            d.cli("egress", "rm", str(rid), check=True)
            rules.remove(rid)
            assert not reaches(d, a1["ref"], w, w.lan)
            # a deny closes what the policy leaves open, and wins over an allow
            deny = d.call("egress.deny", dest=w.public, user=bob)
            rules.append(deny["id"])
            allow = d.call("egress.allow", dest=w.public, workspace=f"{bob}/one")
            rules.append(allow["id"])
            assert not reaches(d, b1["ref"], w, w.public)
            assert reached(d, a1["ref"], w, w.public)
            # every change was audited
            audit = d.call("audit.list", limit=50)
            methods = [e["method"] for e in audit]
            for name in ("egress.allow", "egress.deny", "egress.remove"):
                assert name in methods, methods
        # a deleted workspace takes its rules along
        wrule = d.call("egress.allow", dest="192.168.0.0/16", workspace=f"{bob}/one")
        d.call("workspace.delete", ref=b1["ref"])
        assert all(x["id"] != wrule["id"] for x in d.call("egress.list"))
    finally:
        for rid in rules:
            with contextlib.suppress(RpcError):
                d.call("egress.remove", id=rid)


def test_rules_survive_a_restart(spare_daemon: Daemon) -> None:
    d = spare_daemon
    with make_users(d) as users:
        owner = users.make()
        ws = create(d, owner, "keep")
        rule = d.call("egress.allow", dest="192.168.0.0/16", user=owner)
        try:
            d.restart()
            assert any(x["id"] == rule["id"] for x in d.call("egress.list"))
            with world(subnet_of(ws["address"])) as w:
                assert reached(d, ws["ref"], w, w.lan)
                assert not reaches(d, ws["ref"], w, METADATA)
        finally:
            d.call("egress.remove", id=rule["id"])
            d.call("workspace.delete", ref=ws["ref"])
        assert_gone(d, ws["id"])


def test_bad_rules_are_refused(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    owner = users.make()
    assert "hostname" in invalid(d, "egress.allow", "dest", dest="metadata.google.internal")
    assert "IPv4" in invalid(d, "egress.allow", "dest", dest="not an address!")
    assert "IPv6" in invalid(d, "egress.allow", "dest", dest="fe80::1")
    assert "every private" in invalid(d, "egress.allow", "dest", dest="0.0.0.0/0")
    invalid(d, "egress.allow", "dest", dest="0.0.0.0/1")
    invalid(d, "egress.allow", "dest", dest="127.0.0.1")
    assert "host bits" in invalid(d, "egress.allow", "dest", dest="192.168.1.7/24")
    invalid(d, "egress.allow", "port", dest="192.168.1.7", port=70000)
    invalid(d, "egress.allow", "port", dest="192.168.1.7", port=0)
    invalid(d, "egress.allow", "proto", dest="192.168.1.7", proto="icmp")
    invalid(d, "egress.allow", "user", dest="192.168.1.7", user="nosuchuser")
    invalid(d, "egress.allow", "workspace", dest="192.168.1.7", workspace=f"{owner}/nope")
    invalid(d, "egress.allow", "workspace", dest="10.1.2.3", user=owner, workspace=f"{owner}/x")
    with pytest.raises(RpcError) as info:
        d.call("egress.remove", id=99999999)
    assert info.value.code == -32001
    # a member may not open anything, nor read the rules
    for method, params in (("egress.allow", {"dest": "192.168.1.7"}), ("egress.list", {})):
        resp = d.call_as(owner, method, params)
        assert resp["error"]["code"] == -32003, resp
    # a deny of everything is fine (no egress for that user at all)
    r = d.call("egress.deny", dest="0.0.0.0/0", user=owner)
    d.call("egress.remove", id=r["id"])


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def mac(dev: str, ns: str = "") -> str:
    where = ["-n", ns] if ns else []
    out = subprocess.run(["ip", *where, "-br", "link", "show", dev], capture_output=True, text=True)
    return out.stdout.split()[2]


def test_no_ipv6_is_forwarded(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    """A workspace given IPv6 by hand (den gives none) cannot send it through the host,
    even with forwarding on for its bridge (force_forwarding, Linux 6.17+)."""
    d = pool_daemon
    ws = create(d, users.make(), "six")
    ns, br = f"den{d.instance}-{ws['id']}", f"den{d.instance}"
    tag = f"fd42:{random.randint(0x1000, 0xFFFF):x}"
    ws6, gw6, out6, hop6 = f"{tag}:1::2", f"{tag}:1::1", f"{tag}:2::2", f"{tag}:2::1"
    sysctls: dict[Path, str] = {}
    try:
        with world(subnet_of(ws["address"])) as w:
            h = w.host
            ip("-6", "addr", "add", f"{gw6}/64", "dev", br, "nodad")
            ip("-6", "addr", "add", f"{hop6}/64", "dev", h.host_if, "nodad")
            ip("-n", h.ns, "-6", "addr", "add", f"{out6}/64", "dev", h.peer_if, "nodad")
            ip("-n", h.ns, "-6", "route", "add", "default", "via", hop6)
            ip("-n", ns, "-6", "addr", "add", f"{ws6}/64", "dev", "eth0", "nodad")
            ip("-n", ns, "-6", "route", "add", "default", "via", gw6)
            # Neighbour discovery with the host is dropped by den's input chain (as
            # all but den's ports): static entries, so that only forwarding is tried.
            nud = ("nud", "permanent")
            ip("-n", ns, "-6", "neigh", "add", gw6, "lladdr", mac(br), "dev", "eth0", *nud)
            ip("-6", "neigh", "add", ws6, "lladdr", mac("eth0", ns), "dev", br, *nud)
            for dev in (br, h.host_if):
                path = Path(f"/proc/sys/net/ipv6/conf/{dev}/force_forwarding")
                if not path.exists():
                    pytest.skip("this kernel has no per-interface IPv6 forwarding")
                sysctls[path] = path.read_text()
                path.write_text("1")
            # the outside host answers over IPv6 (to the host itself)...
            url = f"http://[{out6}]:{w.port}/"
            with urllib.request.urlopen(url, timeout=3) as resp:
                assert w.token in resp.read().decode()
            seen = requests_seen(w)
            # ...but not to a workspace, whose packets the host would now forward
            for _ in range(3):  # busybox's wget may die before sending (see `reached`)
                res = sh(d, ws["ref"], f"timeout 4 wget -qO- {url}")
                assert res["exit_code"] != 0 and w.token not in res["stdout"], res
                assert requests_seen(w) == seen
                m = re.search(r"meta nfproto ipv6 counter packets (\d+)", nft_table(d))
                if m and int(m.group(1)) > 0:
                    break
            assert m and int(m.group(1)) > 0, nft_table(d)
    finally:
        for path, value in sysctls.items():
            with contextlib.suppress(OSError):
                path.write_text(value)
        # den's bridge outlives this test when other workspaces remain
        subprocess.run(["ip", "-6", "neigh", "del", ws6, "dev", br], capture_output=True)
        subprocess.run(["ip", "-6", "addr", "del", f"{gw6}/64", "dev", br], capture_output=True)
        d.call("workspace.delete", ref=ws["ref"])
    assert_gone(d, ws["id"])


def test_host_forwards_for_den_only(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    """When den turned ip_forward on, the host routes between no other interfaces."""
    d = pool_daemon
    ws = create(d, users.make(), "fwd")
    try:
        before = Path("/run/den/ip_forward.before")
        if not (before.exists() and before.read_text().strip() == "0"):
            assert 'iifname != "den*"' not in nft_table(d)
            pytest.skip("ip_forward was on before den: den adds no guard")
        assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
        assert re.search(
            r'meta nfproto ipv4 iifname != "den\*" oifname != "den\*" counter', nft_table(d)
        )
        with (
            outside_host() as a,
            outside_host() as b,
            tempfile.TemporaryDirectory(prefix="den-fwd-") as tmp,
        ):
            port = random.randint(20000, 30000)
            argv = ["/usr/bin/python3", "-m", "http.server", "--bind", b.address, str(port)]
            b.start([*argv, "--directory", tmp], Path(tmp) / "log")
            # the host itself reaches b; a, routed through the host, does not
            deadline = time.monotonic() + 15
            while True:
                try:
                    urllib.request.urlopen(f"http://{b.address}:{port}/", timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            res = subprocess.run(
                ["ip", "netns", "exec", a.ns, "/usr/bin/python3", "-c", FETCH, f"http://{b.address}:{port}/"],
                capture_output=True, text=True,
            )  # fmt: skip
            assert res.returncode != 0, res
    finally:
        d.call("workspace.delete", ref=ws["ref"])
    assert_gone(d, ws["id"])
