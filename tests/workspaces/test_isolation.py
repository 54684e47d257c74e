"""Isolation between two users' workspaces, and between a workspace and the host.

User A and user B each own a workspace. A must not see B's processes, read
B's files or reach B's address; root in A must not mount host filesystems,
load modules, open raw devices, write the image or reach host services other
than den's.

What holds for any backend (processes, files, network, the image, /etc) runs on
both (``sides``: a sandbox pair, or a pair of microVMs: two boots); what checks
the sandbox's own walls (subordinate ids, capabilities, devices) on the sandbox.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.workspaces.conftest import (
    BACKENDS,
    BB,
    assert_gone,
    cgroup_pids,
    create,
    detach,
    host_uids,
    make_users,
    ok,
    run,
    sh,
    wait_for,
)

# The devices crun creates; anything else would be a host device.
STANDARD_DEV = {
    "null",
    "zero",
    "full",
    "random",
    "urandom",
    "tty",
    "ptmx",
    "pts",
    "shm",
    "mqueue",
    "console",
    "fd",
    "stdin",
    "stdout",
    "stderr",
    "core",
    "init",
}
CAP_NET_ADMIN, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_ADMIN, CAP_SYS_BOOT, CAP_SYS_TIME = (
    12,
    16,
    17,
    21,
    22,
    25,
)


@dataclass
class Side:
    user: str
    ws: dict[str, Any]
    subuid_start: int
    subuid_count: int

    @property
    def ref(self) -> str:
        return str(self.ws["ref"])

    @property
    def id(self) -> str:
        return str(self.ws["id"])

    @property
    def address(self) -> str:
        return str(self.ws["address"])


def make_pair(d: Daemon, **kw: Any) -> Iterator[tuple[Side, Side]]:
    with make_users(d) as users:
        sides = []
        for _ in range(2):
            user = users.make()
            info = d.call("user.get", name=user)
            ws = create(d, user, "iso", **kw)
            sides.append(Side(user, ws, info["subuid_start"], info["subuid_count"]))
        try:
            yield sides[0], sides[1]
        finally:
            for s in sides:
                d.call("workspace.delete", ref=s.ref)
                assert_gone(d, s.id, timeout=15)


@pytest.fixture(scope="module")
def pair(pool_daemon: Daemon, bb_image: str) -> Iterator[tuple[Side, Side]]:
    """Two users' sandboxes."""
    yield from make_pair(pool_daemon, cpu=0.5, mem="128M")


@pytest.fixture(scope="module")
def vm_pair(pool_microvm: Daemon, bb_image: str) -> Iterator[tuple[Side, Side]]:
    """Two users' microVMs."""
    yield from make_pair(pool_microvm, backend="microvm", cpu=1, mem="256M")


@pytest.fixture(scope="module", params=BACKENDS)
def sides(request: pytest.FixtureRequest) -> tuple[Side, Side]:
    """Two users' workspaces on each backend."""
    found: tuple[Side, Side] = request.getfixturevalue(
        "pair" if request.param == "sandbox" else "vm_pair"
    )
    return found


def is_vm(side: Side) -> bool:
    return side.ws["backend"] == "microvm"


def test_processes_run_as_the_owners_subordinate_ids(
    pool_daemon: Daemon, pair: tuple[Side, Side]
) -> None:
    d = pool_daemon
    a, b = pair
    ranges = []
    for side in pair:
        assert side.subuid_start >= 100000
        lo, hi = side.subuid_start, side.subuid_start + side.subuid_count
        ranges.append((lo, hi))
        ok(d, side.ref, "setsid sleep 1001 </dev/null >/dev/null 2>&1 &", user="dev")
        assert wait_for(lambda s=side: len(cgroup_pids(d, s.id)) >= 3)
        pids = cgroup_pids(d, side.id)
        uids = {u for pid in pids for u in host_uids(pid)}
        assert uids, pids
        assert all(lo <= u < hi for u in uids), (uids, lo, hi)
        assert side.subuid_start + 1000 in uids  # `dev` (1000 inside) is start+1000 outside
        assert ok(d, side.ref, "cat /proc/self/uid_map").split() == [
            "0",
            str(side.subuid_start),
            str(side.subuid_count),
        ]
    (alo, ahi), (blo, bhi) = ranges
    assert ahi <= blo or bhi <= alo, f"ranges overlap: {ranges}"
    assert a.subuid_start != b.subuid_start


def test_a_cannot_see_bs_processes(pool_daemon: Daemon, sides: tuple[Side, Side]) -> None:
    d = pool_daemon
    a, b = sides
    detach(d, b.ref, "exec sleep 4242")
    assert wait_for(lambda: "sleep 4242" in ok(d, b.ref, "ps -o args"))
    ps = ok(d, a.ref, "ps -o pid,args")
    assert "4242" not in ps
    init = "/run/den/den-agent" if is_vm(a) else "/dev/init"  # a microVM's PID 1: den's agent
    assert ps.splitlines()[1].split()[0] == "1" and init in ps.splitlines()[1]
    # Every process A sees is one of A's own (its init, its sleep, this ps and its shell;
    # a microVM's kernel threads too, [bracketed]).
    own = {line.split(None, 1)[1] for line in ps.splitlines()[1:]}
    own = {c for c in own if not c.startswith("[")}
    assert all(any(w in c for w in ("init", "den-agent", "sleep", "ps")) for c in own), own
    host_pids = cgroup_pids(d, b.id)
    for pid in host_pids:
        res = sh(d, a.ref, f"kill -0 {pid}; cat /proc/{pid}/environ")
        assert res["exit_code"] != 0 or not res["stdout"], res


def test_a_cannot_read_bs_files(pool_daemon: Daemon, sides: tuple[Side, Side]) -> None:
    d = pool_daemon
    a, b = sides
    token = secrets.token_hex(8)
    ok(
        d,
        b.ref,
        f"echo {token} > /root/secret; echo {token} > /code/secret; chmod 600 /root/secret",
    )
    found = ok(
        d,
        a.ref,
        "find / \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -type f -print "
        f"| xargs grep -l {token} 2>/dev/null; true",
    )
    assert found.strip() == ""
    mounts = ok(d, a.ref, "cat /proc/self/mountinfo")
    assert b.id not in mounts
    if is_vm(a):  # its root: den's virtiofs share of its own snapshot, by tag
        assert any(ln.split()[4] == "/" and "virtiofs root" in ln for ln in mounts.splitlines())
    else:
        assert "/volumes/" in mounts and all(
            a.id in line for line in mounts.splitlines() if "/volumes/" in line
        ), mounts
    assert run(d, a.ref, "cat", "/root/secret")["exit_code"] != 0
    # B's files are owned by B's range on the host: A's range gets no access.
    assert ok(d, b.ref, "cat /root/secret").strip() == token


class Listener:
    """A TCP server on the host that answers "host" to whoever connects."""

    def __init__(self, host: str = "0.0.0.0", port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with contextlib.suppress(OSError):
                conn.sendall(b"host\n")
            conn.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def host_addresses() -> list[str]:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    addrs = []
    for line in out.splitlines():
        parts = line.split()
        name, addr = parts[1], parts[3].split("/")[0]
        if name != "lo" and not name.startswith("den"):
            addrs.append(addr)
    return addrs


def test_network_isolation(pool_daemon: Daemon, sides: tuple[Side, Side]) -> None:
    d = pool_daemon
    a, b = sides
    gateway = a.address.rsplit(".", 2)[0] + ".0.1"
    ok(d, b.ref, "httpd -p 8080 -h /var/www")
    assert wait_for(lambda: "hello" in sh(d, b.ref, "wget -qO- http://127.0.0.1:8080/")["stdout"])
    # den (root on the host) reaches B: the server is really there.
    with urllib.request.urlopen(f"http://{b.address}:8080/", timeout=5) as resp:
        assert resp.read() == b"hello from bb\n"
    # nc works inside (the checks below are not vacuous)...
    assert "HTTP" in sh(d, b.ref, "echo x | nc -w 2 127.0.0.1 8080")["stdout"]
    # ...but A cannot reach B: no TCP (and no ping; busybox ping needs a raw
    # socket, so the Debian test checks ping with iputils).
    res = sh(d, a.ref, f"ping -c 1 -W 1 {b.address}")
    assert res["exit_code"] != 0, res
    res = sh(d, a.ref, f"timeout 2 wget -qO- http://{b.address}:8080/")
    assert res["exit_code"] not in (0, 139) and "hello" not in res["stdout"], res
    res = sh(d, a.ref, f"echo x | nc -w 2 {b.address} 8080")
    assert "HTTP" not in res["stdout"], res
    # A reaches its gateway for ping replies? No: nothing on the host but den's ports.
    listener = Listener()
    try:
        for host in [gateway, *host_addresses()]:
            with socket.create_connection((host, listener.port), timeout=5) as s:
                assert s.recv(16) == b"host\n"  # reachable from the host itself
            res = sh(d, a.ref, f"nc -w 2 {host} {listener.port} </dev/null")
            assert "host" not in res["stdout"], (host, res)
        before = listener.accepted
        res = sh(d, a.ref, f"nc -w 2 {gateway} {listener.port} </dev/null")
        assert listener.accepted == before and "host" not in res["stdout"], res
    finally:
        listener.close()


def test_root_cannot_mount_or_load_modules(pool_daemon: Daemon, pair: tuple[Side, Side]) -> None:
    d = pool_daemon
    a, _ = pair
    assert ok(d, a.ref, "id -u") == "0\n"
    res = sh(d, a.ref, "mkdir -p /mnt/t && mount -t tmpfs t /mnt/t")
    assert res["exit_code"] != 0, res
    assert any(w in res["stderr"].lower() for w in ("denied", "not permitted")), res
    for dev in ("/dev/vda", "/dev/sda", "/dev/loop0"):
        res = sh(d, a.ref, f"mount {dev} /mnt/t")
        assert res["exit_code"] != 0, res
    res = sh(d, a.ref, "mknod /tmp/blk b 7 0")
    assert res["exit_code"] != 0 and "not permitted" in res["stderr"], res
    res = sh(d, a.ref, "mknod /tmp/mem c 1 1")
    assert res["exit_code"] != 0, res
    # No capability that reaches the host.
    cap = int(ok(d, a.ref, "grep CapEff /proc/self/status").split()[1], 16)
    for bit in (
        CAP_NET_ADMIN,
        CAP_SYS_MODULE,
        CAP_SYS_RAWIO,
        CAP_SYS_ADMIN,
        CAP_SYS_BOOT,
        CAP_SYS_TIME,
    ):
        assert not cap & (1 << bit), f"capability {bit} is effective ({cap:x})"
    bnd = int(ok(d, a.ref, "grep CapBnd /proc/self/status").split()[1], 16)
    assert not bnd & (1 << CAP_SYS_MODULE | 1 << CAP_SYS_ADMIN)
    res = sh(d, a.ref, "echo junk > /tmp/x.ko; insmod /tmp/x.ko")
    assert res["exit_code"] != 0, res
    res = sh(d, a.ref, "rmmod loop")
    assert res["exit_code"] != 0, res
    for path in (
        "/proc/sys/kernel/panic",
        "/proc/sys/vm/drop_caches",
        "/proc/sysrq-trigger",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ):
        res = sh(d, a.ref, f"echo 1 > {path}")
        assert res["exit_code"] != 0, (path, res)
    res = sh(d, a.ref, "ip link add dummy0 type dummy")
    assert res["exit_code"] != 0, res
    res = sh(d, a.ref, "ip addr add 10.99.99.99/32 dev eth0")
    assert res["exit_code"] != 0, res
    res = sh(d, a.ref, "hostname evil")
    assert res["exit_code"] != 0 and ok(d, a.ref, "hostname") == "iso\n", res


def test_only_standard_devices(pool_daemon: Daemon, pair: tuple[Side, Side]) -> None:
    d = pool_daemon
    a, _ = pair
    names = set(ok(d, a.ref, "ls -A /dev").split())
    assert names <= STANDARD_DEV, names - STANDARD_DEV
    for dev in (
        "vda",
        "sda",
        "mem",
        "kmem",
        "kmsg",
        "port",
        "loop0",
        "loop-control",
        "kvm",
        "btrfs-control",
        "fuse",
        "net",
    ):
        assert dev not in names
    assert ok(d, a.ref, "head -c 4 /dev/zero | wc -c").strip() == "4"
    assert ok(d, a.ref, "echo x > /dev/null; echo fine") == "fine\n"
    res = sh(d, a.ref, "head -c 1 /dev/core")  # -> /proc/kcore, masked
    assert res["exit_code"] != 0 or res["stdout"] == "", res


def test_image_stays_read_only(pool_daemon: Daemon, sides: tuple[Side, Side]) -> None:
    d = pool_daemon
    a, b = sides
    image = d.data_dir / "pool" / "images" / BB
    before = sorted(p.name for p in (image / "etc").iterdir())
    passwd = (image / "etc/passwd").read_bytes()
    ok(
        d,
        a.ref,
        "echo mine > /etc/written; echo 'evil:x:0:0::/:/bin/sh' >> /etc/passwd; rm /bin/ls",
    )
    assert sorted(p.name for p in (image / "etc").iterdir()) == before
    assert (image / "etc/passwd").read_bytes() == passwd
    assert (image / "bin/ls").is_symlink()
    prop = subprocess.run(
        ["btrfs", "property", "get", "-ts", str(image), "ro"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert prop.stdout.strip() == "ro=true"
    # B, made from the same image, is unaffected.
    assert run(d, b.ref, "cat", "/etc/written")["exit_code"] != 0
    assert "evil" not in ok(d, b.ref, "cat /etc/passwd")
    assert ok(d, b.ref, "ls -d /bin") == "/bin\n"


def test_resolver_and_etc_files(pool_daemon: Daemon, sides: tuple[Side, Side]) -> None:
    d = pool_daemon
    a, _ = sides
    wanted = [
        line.split()[1]
        for line in Path("/etc/resolv.conf").read_text().splitlines()
        if line.startswith("nameserver") and not line.split()[1].startswith(("127.", "::1"))
    ]
    inside = [
        line.split()[1]
        for line in ok(d, a.ref, "cat /etc/resolv.conf").splitlines()
        if line.startswith("nameserver")
    ]
    assert inside == wanted
    # A microVM names itself 127.0.1.1 (Debian's way: its address may change).
    mapped = "127.0.1.1" if is_vm(a) else a.address
    assert f"{mapped}\tiso" in ok(d, a.ref, "cat /etc/hosts")
    if not is_vm(a):  # a guest's root owns its own kernel's mounts: nothing to protect
        res = sh(d, a.ref, "echo x >> /etc/resolv.conf")
        assert res["exit_code"] != 0, res  # den's bind mount is read-only
