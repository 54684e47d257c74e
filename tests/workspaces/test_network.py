"""Workspace networking: the nftables ruleset, egress NAT to a server in a network
namespace the test makes itself (nothing leaves this machine), egress turned
off, den's own ports on the gateway, and the undoing of every host change when
the last workspace goes.
"""

from __future__ import annotations

import contextlib
import json
import pwd
import random
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.helpers.outside import outside_host
from tests.workspaces.conftest import (
    Users,
    assert_gone,
    create,
    link_exists,
    list_all,
    make_users,
    ok,
    sh,
    veth,
)
from tests.workspaces.test_isolation import Listener

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def nft(*args: str) -> str:
    res = subprocess.run(["nft", *args], capture_output=True, text=True, check=False)
    return res.stdout if res.returncode == 0 else ""


def den_tables(instance: int) -> list[str]:
    return [
        line
        for line in nft("list", "tables").splitlines()
        if line in (f"table inet den{instance}", f"table ip den{instance}-nat")
    ]


def chain(table: str, name: str) -> str:
    """The rules of one chain of ``nft list table`` output."""
    m = re.search(rf"chain {name} {{(.*?)\n\s*}}", table, re.S)
    assert m, table
    return m.group(1)


def gateway_of(address: str) -> str:
    a, b, _, _ = address.split(".")
    return f"{a}.{b}.0.1"


@dataclass
class Outside:
    """An HTTP server in a network namespace of the test's own, routed from the host."""

    address: str
    port: int
    token: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/"


@contextlib.contextmanager
def outside_server() -> Iterator[Outside]:
    """An HTTP server on an outside host, serving a token of its own."""
    port = random.randint(20000, 30000)
    docroot = Path(tempfile.mkdtemp(prefix="den-outside-"))
    token = secrets.token_hex(8)
    (docroot / "index.html").write_text(token + "\n")
    log = docroot / "server.log"
    try:
        with outside_host() as host:
            argv = ["/usr/bin/python3", "-m", "http.server", "--bind", host.address]
            server = host.start([*argv, "--directory", str(docroot), str(port)], log)
            deadline = time.monotonic() + 15
            while True:
                try:
                    url = f"http://{host.address}:{port}/"
                    with urllib.request.urlopen(url, timeout=2) as resp:
                        assert resp.read().decode().strip() == token
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.1)
            yield Outside(host.address, port, token, log)
    finally:
        shutil.rmtree(docroot, ignore_errors=True)


def test_ruleset_isolation_and_nat(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    n = d.instance
    ws = create(d, users.make(), "fw")
    try:
        table = nft("list", "table", "inet", f"den{n}")
        br = f'"den{n}"'
        # workspace to workspace: dropped
        assert re.search(rf"iifname {br} oifname {br} counter packets \d+ bytes \d+ drop", table)
        # nothing from outside into a workspace
        assert re.search(rf"oifname {br} counter packets \d+ bytes \d+ drop", table)
        # the host: only den's ports, the rest dropped
        assert re.search(rf"iifname {br} tcp dport .* accept", table)
        last_input = chain(table, "input").strip().splitlines()[-1].strip()
        assert re.fullmatch(rf"iifname {br} counter packets \d+ bytes \d+ drop", last_input)
        last_forward = chain(table, "forward").strip().splitlines()[-1].strip()
        assert re.fullmatch(rf"iifname {br} counter packets \d+ bytes \d+ accept", last_forward)
        # only root (and the account den's Caddy runs as) on the host connects to workspaces
        web_uid = pwd.getpwnam(f"{d.prefix}-web").pw_uid
        assert re.search(
            rf"oifname {br} meta skuid != {{ 0, {web_uid} }} counter .* reject", table
        ), table
        nat = nft("list", "table", "ip", f"den{n}-nat")
        subnet = f"10.{77 + n}.0.0/16"
        assert re.search(rf"ip saddr {re.escape(subnet)} oifname != {br} masquerade", nat), nat
        assert IP_FORWARD.read_text().strip() == "1"
        # the workspace's bridge port is isolated
        link = subprocess.run(
            ["bridge", "-d", "link", "show", "dev", veth(d, ws["id"])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "isolated on" in link, link
        assert f"master den{n}" in link
    finally:
        d.call("workspace.delete", ref=ws["ref"])
    assert_gone(d, ws["id"])


def test_egress_through_nat_to_a_local_server(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    ws = create(d, users.make(), "out")
    try:
        with outside_server() as srv:
            out = ok(d, ws["ref"], f"timeout 5 wget -qO- {srv.url}")
            assert out.strip() == srv.token
            # The server saw the host's address on its link (masquerade), not the workspace's.
            log = srv.log.read_text()
            assert srv.address.rsplit(".", 1)[0] + ".1 " in log, log
            assert ws["address"] not in log
    finally:
        d.call("workspace.delete", ref=ws["ref"])
    assert_gone(d, ws["id"])


def test_egress_off(spare_daemon: Daemon) -> None:
    d = spare_daemon
    n = d.instance
    d.env["DEN_EGRESS"] = "false"
    d.restart()
    try:
        with make_users(d) as users:
            ws = create(d, users.make(), "closed")
            forward = chain(nft("list", "table", "inet", f"den{n}"), "forward")
            last = forward.strip().splitlines()[-1].strip()
            assert re.fullmatch(rf'iifname "den{n}" counter packets \d+ bytes \d+ drop', last), (
                forward
            )
            with outside_server() as srv:
                res = sh(d, ws["ref"], f"timeout 3 wget -qO- {srv.url}")
                assert res["exit_code"] not in (0, 139) and srv.token not in res["stdout"], res
                assert ws["address"] not in srv.log.read_text()
                # the host itself still reaches the server: the drop is den's
                with urllib.request.urlopen(srv.url, timeout=5) as resp:
                    assert resp.read().decode().strip() == srv.token
            forward = chain(nft("list", "table", "inet", f"den{n}"), "forward")
            last = forward.strip().splitlines()[-1].strip()
            m = re.fullmatch(rf'iifname "den{n}" counter packets (\d+) bytes \d+ drop', last)
            assert m, forward
            # den's rule dropped the attempt; or, when no other den on this host needs
            # forwarding, the kernel did not forward it at all (den leaves ip_forward off)
            with open("/proc/sys/net/ipv4/ip_forward") as f:
                forwarding = f.read().strip() == "1"
            assert int(m.group(1)) > 0 or not forwarding, forward
            d.call("workspace.delete", ref=ws["ref"])
            assert_gone(d, ws["id"])
    finally:
        d.env.pop("DEN_EGRESS", None)
        d.restart()


def test_gateway_only_on_dens_ports(spare_daemon: Daemon) -> None:
    d = spare_daemon
    ssh_port = int(d.env["DEN_SSH_PORT"])
    info = json.loads((d.data_dir / "serve.json").read_text())
    assert info["ssh_port"] == ssh_port
    with make_users(d) as users:
        ws = create(d, users.make(), "gw")
        gw = gateway_of(ws["address"])
        listener = Listener()
        try:
            res = sh(d, ws["ref"], f"nc -w 3 {gw} {ssh_port} </dev/null")
            assert res["stdout"].startswith("SSH-2.0"), res
            res = sh(d, ws["ref"], f"nc -w 2 {gw} {listener.port} </dev/null")
            assert "host" not in res["stdout"] and listener.accepted == 0, res
        finally:
            listener.close()
            d.call("workspace.delete", ref=ws["ref"])
        assert_gone(d, ws["id"])


def test_last_workspace_undoes_host_changes(spare_daemon: Daemon) -> None:
    d = spare_daemon
    n = d.instance
    assert list_all(d) == []
    others = [
        x
        for x in Path("/sys/class/net").iterdir()
        if re.fullmatch(r"den\d+", x.name) and x.name != f"den{n}"
    ]
    before = IP_FORWARD.read_text().strip()
    with make_users(d) as users:
        owner = users.make()
        w1 = create(d, owner, "one")
        w2 = create(d, owner, "two")
        assert link_exists(f"den{n}") and len(den_tables(n)) == 2
        assert IP_FORWARD.read_text().strip() == "1"
        d.call("workspace.delete", ref=w1["ref"])
        assert link_exists(f"den{n}") and len(den_tables(n)) == 2  # w2 still needs them
        assert ok(d, w2["ref"], "echo up") == "up\n"
        d.call("workspace.delete", ref=w2["ref"])
        for w in (w1, w2):
            assert_gone(d, w["id"])
    assert not link_exists(f"den{n}")
    assert den_tables(n) == []
    state = d.data_dir / "network.json"
    if before == "0" and not others:
        assert IP_FORWARD.read_text().strip() == "0"
        assert not state.exists()
    else:
        # den found forwarding on (or another instance needs it): it is left as it was
        # found, and den holds no claim to restore it.
        assert IP_FORWARD.read_text().strip() == "1"
        if before == "1":
            assert "ip_forward_before" not in (state.read_text() if state.exists() else "")
    # and a restart of the daemon does not bring them back
    d.restart()
    assert not link_exists(f"den{n}") and den_tables(n) == []


@pytest.mark.slow
def test_debian_apt_get_and_ping(
    pool_daemon: Daemon, debian_image: str, bb_image: str, users: Users
) -> None:
    """Root in a Debian workspace installs a package from the Debian mirror (through
    den's NAT and resolver), and ping works inside but does not reach a neighbour."""
    d = pool_daemon
    ws = create(d, users.make(), "deb", image=debian_image, mem="512M")
    other = create(d, users.make(), "target")
    try:
        res = sh(
            d,
            ws["ref"],
            "apt-get -qq update && DEBIAN_FRONTEND=noninteractive "
            "apt-get -qq install -y --no-install-recommends iputils-ping",
            timeout=300,
            user="root",
        )
        assert res["exit_code"] == 0, res
        assert ok(d, ws["ref"], "ping -c 1 -W 2 127.0.0.1 >/dev/null && echo pong") == "pong\n"
        res = sh(d, ws["ref"], f"ping -c 1 -W 2 {other['address']}")
        assert res["exit_code"] != 0, res
        res = sh(d, ws["ref"], f"ping -c 1 -W 2 {gateway_of(ws['address'])}")
        assert res["exit_code"] != 0, res
    finally:
        d.call("workspace.delete", ref=ws["ref"])
        d.call("workspace.delete", ref=other["ref"])
    assert_gone(d, ws["id"])
    assert_gone(d, other["id"])
