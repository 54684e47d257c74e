"""A workspace cannot take another's traffic from the host.

The host (Caddy proxying a workspace URL, den itself) reaches a workspace at
its address. Root in a workspace cannot send ARP or change its MAC: its
capabilities do not reach the network namespace (the host's user namespace
owns it) and seccomp refuses packet and raw sockets. Should that wall fall,
the host still pins each workspace address to den's MAC for it, and the
bridge sends that MAC to its port only. The test plays that attacker from the
host, in the workspace's network namespace with the host's capabilities.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

from tests.conftest import Daemon
from tests.workspaces.conftest import Users, assert_gone, create, detach, ns_exec, ok, sh
from tests.workspaces.test_network import gateway_of

PORT = 8080


def neighbour(d: Daemon, address: str) -> dict[str, object] | None:
    """The host's neighbour entry of ``address`` on the instance's bridge."""
    out = subprocess.run(
        ["ip", "-j", "neigh", "show", "to", address, "dev", f"den{d.instance}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    entries: list[dict[str, object]] = json.loads(out or "[]")
    return entries[0] if entries else None


def fetch(address: str) -> str:
    """What the host gets from ``address``'s web server ("" when it does not answer)."""
    try:
        with urllib.request.urlopen(f"http://{address}:{PORT}/", timeout=3) as resp:
            return str(resp.read().decode()).strip()
    except OSError:
        return ""


def serve_name(d: Daemon, ref: str, name: str, address: str) -> None:
    """A busybox httpd in the workspace answering its own name; waits until the host sees it."""
    ok(d, ref, f"mkdir -p /tmp/www && echo {name} > /tmp/www/index.html")
    detach(d, ref, f"exec httpd -f -p {PORT} -h /tmp/www")
    deadline = time.monotonic() + 10
    while (got := fetch(address)) != name and time.monotonic() < deadline:
        time.sleep(0.1)
    assert got == name


def test_a_workspace_cannot_claim_anothers_address_or_mac(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make()
    a = create(d, owner, "spoofer")
    b = create(d, owner, "victim")
    b_addr, gw = b["address"], gateway_of(b["address"])
    serve_name(d, a["ref"], "spoofer", a["address"])
    serve_name(d, b["ref"], "victim", b_addr)
    b_mac = ok(d, b["ref"], "cat /sys/class/net/eth0/address").strip()
    a_mac = ok(d, a["ref"], "cat /sys/class/net/eth0/address").strip()
    assert a_mac != b_mac
    entry = neighbour(d, b_addr)
    assert entry is not None and entry["lladdr"] == b_mac, entry
    assert "PERMANENT" in entry["state"], entry  # type: ignore[operator]

    # The first wall: from inside, no ARP of its own and no MAC change.
    res = sh(d, a["ref"], f"arping -U -c 1 -I eth0 -s {b_addr} {b_addr}", user="root")
    assert res["exit_code"] != 0 and "not permitted" in res["stderr"], res
    sh(d, a["ref"], f"ip link set dev eth0 address {b_mac}", user="root")
    assert ok(d, a["ref"], "cat /sys/class/net/eth0/address").strip() == a_mac

    # Past it: A takes B's address too, and says so with gratuitous ARP and
    # unsolicited ARP answers, "B's address is at A's MAC".
    a_ns = f"den{d.instance}-{a['id']}"

    def in_a(script: str) -> None:
        ns_exec(a_ns, "busybox", "sh", "-c", script, check=True)

    time.sleep(1.5)  # past the kernel's locktime, when a learned entry would follow them
    in_a(f"busybox ip addr add {b_addr}/32 dev eth0")
    in_a(
        f"busybox arping -U -c 2 -I eth0 -s {b_addr} {b_addr}; "
        f"busybox arping -A -c 2 -I eth0 -s {b_addr} {gw}; true"
    )
    assert fetch(b_addr) == "victim"
    entry = neighbour(d, b_addr)
    assert entry is not None and entry["lladdr"] == b_mac, entry

    # A takes B's MAC and sends with it: the bridge must not send B's frames to A.
    in_a(f"busybox ip link set dev eth0 address {b_mac}")
    in_a(f"busybox arping -c 2 -I eth0 {gw}; busybox arping -A -c 2 -I eth0 -s {b_addr} {gw}; true")
    assert fetch(b_addr) == "victim"
    entry = neighbour(d, b_addr)
    assert entry is not None and entry["lladdr"] == b_mac, entry

    # B goes: its pinned entry goes with it (the address is free for the next one).
    d.call("workspace.delete", ref=b["ref"])
    assert_gone(d, b["id"])
    entry = neighbour(d, b_addr)
    assert entry is None or "PERMANENT" not in entry["state"], entry  # type: ignore[operator]
