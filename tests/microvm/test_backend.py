"""The microvm backend through the real daemon: QEMU microvm guests under TCG here.

One module daemon with microVMs on, and as few boots as the checks allow (each
TCG boot costs seconds of CPU): one VM carries the lifecycle, the daemon's
``kill -9`` and a killed QEMU; a second one the isolation checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from den.net import names
from tests.conftest import Daemon, dispose, init_pool, make_base
from tests.microvm.conftest import seed_assets, wait_for
from tests.workspaces.conftest import BB, detach, import_bb, make_users, ok, sh

pytestmark = pytest.mark.slow
MEM = "256M"


@pytest.fixture(scope="module")
def vm_daemon(microvm_assets: object) -> Iterator[Daemon]:
    d = Daemon(make_base())
    d.env.update({"DEN_MICROVM": "true", "DEN_DEFAULT_IMAGE": BB, "DEN_RECONCILE_INTERVAL": "1"})
    try:
        seed_assets(d.data_dir)
        init_pool(d, size="4G")
        d.start()
        import_bb(d)
        yield d
    finally:
        dispose(d, pool=True)


@pytest.fixture(scope="module")
def owner(vm_daemon: Daemon) -> Iterator[str]:
    with make_users(vm_daemon) as users:
        yield users.make()


def create_vm(d: Daemon, owner: str, name: str) -> dict[str, Any]:
    ws: dict[str, Any] = d.call(
        "workspace.create", name=name, user=owner, image=BB, backend="microvm", mem=MEM, cpu=1
    )
    assert ws["backend"] == "microvm" and ws["state"] == "running", ws
    return ws


def vmdir(d: Daemon, ws_id: str) -> Path:
    return d.data_dir / "vms" / ws_id


def qemu_pid(d: Daemon, ws_id: str) -> int:
    return int((vmdir(d, ws_id) / "qemu.pid").read_text())


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime of every thread


def cgroup_procs(d: Daemon, ws_id: str) -> list[int]:
    path = Path(f"/sys/fs/cgroup/pids/den{d.instance}/{ws_id}/cgroup.procs")
    if not path.parent.exists():
        path = Path(f"/sys/fs/cgroup/den{d.instance}/{ws_id}/cgroup.procs")
    try:
        return [int(x) for x in path.read_text().split()]
    except OSError:
        return []


def vm_traces(d: Daemon, ws_id: str) -> list[str]:
    """What the host still has of a microVM."""
    found = []
    if vmdir(d, ws_id).exists():
        found.append(f"dir {vmdir(d, ws_id)}")
    tap = names.tap(d.instance, ws_id)
    if Path(f"/sys/class/net/{tap}").exists():
        found.append(f"tap {tap}")
    for c in ("memory", "pids", "cpu", ""):
        p = Path("/sys/fs/cgroup") / c / f"den{d.instance}" / ws_id
        if p.exists():
            found.append(f"cgroup {p}")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"/vms/{ws_id}/".encode() in cmd and b"qemu" in cmd:
                found.append(f"process {pid}")
    sets = json.dumps(nft_sets(d))
    if tap in sets:
        found.append("anti-spoofing elements")
    return found


def nft_sets(d: Daemon) -> Any:
    import subprocess

    res = subprocess.run(
        ["nft", "-j", "list", "table", "bridge", f"den{d.instance}_vm"],
        capture_output=True,
        text=True,
        check=False,
    )
    return json.loads(res.stdout) if res.returncode == 0 else {}


def wait_gone(d: Daemon, ws_id: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := vm_traces(d, ws_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"microVM {ws_id} left {left}"


def counter(d: Daemon, ref: str) -> int:
    out = sh(d, ref, "cat /tmp/c 2>/dev/null")["stdout"].strip()
    return int(out) if out.isdigit() else 0


def guest_mem_kb(d: Daemon, ref: str) -> int:
    return int(ok(d, ref, "awk '/MemTotal/ {print $2}' /proc/meminfo").strip())


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def assert_clock(d: Daemon, ref: str) -> None:
    """The guest's clock is the host's, within a second (around the exec's own time)."""
    before = time.time()
    guest = int(ok(d, ref, "date +%s").strip())
    after = time.time()
    assert before - 1 <= guest <= after + 1, (before, guest, after)


def test_lifecycle(vm_daemon: Daemon, owner: str) -> None:
    """create (QEMU unprivileged, the guest's clock right) -> exec -> suspend (QEMU's CPU
    time flat) -> resume (a counter goes on, the clock right) -> kill -9 of the daemon
    (the VM runs on, found again) -> stop -> start -> a killed QEMU is failed, with a
    reason and nothing of it running, and starts again with its files -> delete."""
    d = vm_daemon
    ref = f"{owner}/life"
    t0 = time.monotonic()
    ws = create_vm(d, owner, "life")
    assert ok(d, ref, "echo hi") == "hi\n"
    print(f"create -> first exec: {time.monotonic() - t0:.2f} s")
    try:
        pid = qemu_pid(d, ws["id"])
        assert pid in cgroup_procs(d, ws["id"])  # QEMU runs in the workspace's cgroup
        # QEMU runs as the workspace's own uid, without groups or capabilities; its
        # TAP is that uid's
        st = proc_status(pid)
        uid = int(st["Uid"].split()[0])
        assert uid != 0 and set(st["Uid"].split()) == {str(uid)}, st["Uid"]
        assert int(st["CapEff"], 16) == 0 and int(st["CapPrm"], 16) == 0, st
        assert st["Groups"] == "" and st["NoNewPrivs"] == "1", st
        tap = names.tap(d.instance, ws["id"])
        assert Path(f"/sys/class/net/{tap}/owner").read_text().strip() == str(uid)
        assert_clock(d, ref)  # set again once booted, not from a hello sent seconds ago
        detach(d, ref, "i=0; while :; do i=$((i+1)); echo $i > /tmp/c; sleep 0.1; done")
        wait_for(lambda: counter(d, ref) > 0, 10, "the counter to start")

        d.call("workspace.suspend", ref=ref)
        assert d.call("workspace.get", ref=ref)["state"] == "suspended"
        before = cpu_ticks(pid)
        time.sleep(1.0)
        assert cpu_ticks(pid) - before <= 5  # 50 ms of CPU in 1 s at most: the guest is stopped
        time.sleep(2.0)  # the guest's clock stands still meanwhile
        t = time.monotonic()
        d.call("workspace.resume", ref=ref)
        print(f"resume RPC: {(time.monotonic() - t) * 1000:.1f} ms")
        assert_clock(d, ref)
        c1 = counter(d, ref)
        wait_for(lambda: counter(d, ref) > c1, 10, "the counter to go on after resume")

        # kill -9 of the daemon: QEMU runs on, a new daemon finds it
        d.stop(signal.SIGKILL)
        assert alive(pid)
        d.start()
        assert ok(d, ref, "echo back") == "back\n"
        assert qemu_pid(d, ws["id"]) == pid

        # resize: the CPU quota at once; the guest's memory at the next start
        mem_before = guest_mem_kb(d, ref)
        d.call("workspace.resize", ref=ref, cpu=0.5, mem="320M")
        quota = Path(f"/sys/fs/cgroup/cpu/den{d.instance}/{ws['id']}/cpu.cfs_quota_us")
        if quota.exists():
            assert quota.read_text().strip() == "50000"
        assert guest_mem_kb(d, ref) == mem_before
        note = d.call("workspace.get", ref=ref)["backend_note"]
        assert "restart needed: memory 320 MiB" in note, note

        d.call("workspace.stop", ref=ref)
        assert d.call("workspace.get", ref=ref)["state"] == "stopped"
        wait_for(lambda: not alive(pid), 10, "QEMU to end")
        assert not cgroup_procs(d, ws["id"])
        d.call("workspace.start", ref=ref)
        assert ok(d, ref, "echo again") == "again\n"
        assert guest_mem_kb(d, ref) > mem_before + 50_000  # 320 MiB now, was 256
        assert "restart needed" not in d.call("workspace.get", ref=ref)["backend_note"]

        # A killed QEMU: the reconciler marks the workspace failed with a reason and
        # cleans up (virtiofsd, sockets), keeps its files; `den start` boots it again.
        ok(d, ref, "echo kept > /mark && sync")
        pid = qemu_pid(d, ws["id"])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: d.call("workspace.get", ref=ref)["state"] == "failed", 30, "failed")
        got = d.call("workspace.get", ref=ref)
        assert "QEMU ended without den stopping it" in got["state_reason"], got
        assert not cgroup_procs(d, ws["id"]) and not alive(pid)
        left = {p.name for p in vmdir(d, ws["id"]).iterdir()}
        assert not left & {"qemu.pid", "qmp.sock", "agent.sock", "root.sock", "code.sock"}, left
        time.sleep(2.5)  # two more reconciler passes: it is not booted again behind den
        assert d.call("workspace.get", ref=ref)["state"] == "failed"
        assert not (vmdir(d, ws["id"]) / "qemu.pid").exists()
        d.call("workspace.start", ref=ref)
        assert d.call("workspace.get", ref=ref)["state"] == "running"
        assert ok(d, ref, "cat /mark") == "kept\n"
        assert all(alive(p) for p in cgroup_procs(d, ws["id"]))
    finally:
        d.call("workspace.delete", ref=ref)
    wait_gone(d, ws["id"])


def test_isolation_and_anti_spoofing(vm_daemon: Daemon, owner: str) -> None:
    """Two microVMs cannot reach each other; one that takes another address or MAC
    is not heard, while its own address reaches den's listener."""
    d = vm_daemon
    a = create_vm(d, owner, "iso-a")
    try:
        b = create_vm(d, owner, "iso-b")
        try:
            ra, rb = f"{owner}/iso-a", f"{owner}/iso-b"
            detach(d, rb, "httpd -f -p 8080 -h /var/www")
            wait_for(
                lambda: "hello" in sh(d, rb, "wget -q -O- http://127.0.0.1:8080/")["stdout"],
                10,
                "b's web server",
            )
            # den (root on the host) reaches b; a does not
            with urllib.request.urlopen(f"http://{b['address']}:8080/", timeout=5) as r:
                assert b"hello from bb" in r.read()
            res = sh(d, ra, f"wget -q -T 3 -O- http://{b['address']}:8080/")
            assert res["exit_code"] != 0 and "hello" not in res["stdout"], res

            port = json.loads((d.data_dir / "serve.json").read_text())["ssh_port"]
            gw = ok(d, ra, "ip route | awk '/default/ {print $3}'").strip()
            prefix = ok(d, ra, "ip -4 addr show eth0 | awk '/inet / {print $2}'").split("/")[1]

            def heard() -> bool:
                """den's host answers a's packets (a connection, or a refusal: an RST)."""
                res = sh(d, ra, f"nc -w 3 {gw} {port} </dev/null && echo open")
                return "open" in res["stdout"] or "refused" in res["stderr"]

            assert heard()  # its own address and MAC reach den
            # a takes an unused address of the subnet: not heard
            spoof = a["address"].rsplit(".", 1)[0] + ".250"
            sh(d, ra, f"ip addr flush dev eth0 && ip addr add {spoof}/{prefix.strip()} dev eth0 "
                      f"&& ip route add default via {gw}")  # fmt: skip
            assert not heard()
            # its own address back, but another MAC: not heard
            sh(d, ra, f"ip addr flush dev eth0 && ip link set eth0 down && "
                      f"ip link set eth0 address 02:00:00:00:00:99 && ip link set eth0 up && "
                      f"ip addr add {a['address']}/{prefix.strip()} dev eth0 && "
                      f"ip route add default via {gw}")  # fmt: skip
            assert not heard()

            # A guest kernel panic ends its QEMU (panic reboots, -no-reboot exits) and
            # the workspace is failed, saying so
            pid = qemu_pid(d, a["id"])
            with contextlib.suppress(RpcError):
                sh(d, ra, "echo c > /proc/sysrq-trigger", timeout=5)
            wait_for(lambda: not alive(pid), 60, "QEMU to end")
            wait_for(lambda: d.call("workspace.get", ref=ra)["state"] == "failed", 30, "failed")
            reason = d.call("workspace.get", ref=ra)["state_reason"]
            assert "panicked" in reason and "sysrq" in reason, reason
            assert not cgroup_procs(d, a["id"])
        finally:
            d.call("workspace.delete", ref=f"{owner}/iso-b")
        wait_gone(d, b["id"])
    finally:
        d.call("workspace.delete", ref=f"{owner}/iso-a")
    wait_gone(d, a["id"])


def test_kill_daemon_during_create(vm_daemon: Daemon, owner: str) -> None:
    """kill -9 of the daemon while a microVM boots: after the restart's reconciler
    nothing of it is left on the host."""
    d = vm_daemon
    vms = d.data_dir / "vms"
    known = set(os.listdir(vms)) if vms.exists() else set()

    def create() -> None:
        with contextlib.suppress(Exception):  # the daemon dies under the call
            create_vm(d, owner, "doomed")

    t = threading.Thread(target=create, daemon=True)
    t.start()

    def booting() -> str | None:
        new = set(os.listdir(vms)) - known if vms.exists() else set()
        for ws_id in new:
            if (vms / ws_id / "qemu.pid").exists():
                return ws_id
        return None

    wait_for(booting, 60, "the microVM's QEMU to start")
    ws_id = booting()
    assert ws_id is not None
    d.stop(signal.SIGKILL)
    t.join(30)
    d.start()
    wait_gone(d, ws_id, timeout=30)
    assert d.call("workspace.list", user=owner) == [] or all(
        w["name"] != "doomed" for w in d.call("workspace.list", user=owner)
    )


def test_ssh_scp_and_sftp(vm_daemon: Daemon, owner: str, tmp_path: Path) -> None:
    """The SSH gateway into microVMs: a command, a terminal, scp and sftp through the
    image's sftp-server (Debian); a clear error where the image has none (busybox)."""
    from tests.ssh.conftest import Person, ssh_key, ssh_port
    from tests.storage.conftest import debian_image_as

    d = vm_daemon
    deb = debian_image_as(d, "deb")["name"]
    key, pub = ssh_key(tmp_path, owner)
    d.call("key.add", user=owner, key=pub)
    me = Person(d, owner, key, ssh_port(d))
    d.call(
        "workspace.create", name="debvm", user=owner, image=deb, backend="microvm", mem=MEM, cpu=1
    )
    bb = create_vm(d, owner, "bbvm")
    try:
        res = me.ssh("debvm", "cat /etc/debian_version; hostname")
        assert res.returncode == 0 and "debvm" in res.stdout, res
        res = me.ssh("debvm", "tty; stty size", args=("-tt",))
        assert "/dev/pts/" in res.stdout, res
        src = tmp_path / "f.bin"
        src.write_bytes(os.urandom(1 << 20))
        assert me.scp(str(src), "debvm@127.0.0.1:/tmp/f.bin").returncode == 0
        back = tmp_path / "back.bin"
        res = me.sftp("debvm", f"get /tmp/f.bin {back}\n")
        assert res.returncode == 0 and back.read_bytes() == src.read_bytes(), res
        res = me.sftp("bbvm", "ls /\n", timeout=60)
        assert res.returncode != 0
    finally:
        d.call("workspace.delete", ref=f"{owner}/debvm")
        d.call("workspace.delete", ref=f"{owner}/bbvm")
    wait_gone(d, bb["id"])
