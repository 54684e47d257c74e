"""Workspace fixtures: a tiny busybox image, den users, workspaces cleaned up after
each test, and probes of what an instance has on the host.

Host traces of a workspace id: its crun container (``/run/den/crun<N>``), its
cgroup directories (``/sys/fs/cgroup/<controller>/den<N>/<id>``), its netns
(``/var/run/netns/den<N>-<id>``), its veth (``d<N>-<id>``), its volume, bundle
and idmapped views, and any mount under them; a microVM's: its VM directory
(``DATA_DIR/vms/<id>``), its TAP (``t<N>-<id>``), its QEMU and virtiofsd
processes, its cgroup.

Tests that make sense on both backends take the ``backend`` fixture ("sandbox",
and "microvm" marked slow); the microvm cases run on the session's pool daemon
once ``pool_microvm`` seeded its guest assets.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon, running_daemon
from tests.storage.conftest import debian_image_as, tar_dir, wait_job

BB = "bb"
DEB = "deb"
BUSYBOX = Path("/bin/busybox")
CGROUP = Path("/sys/fs/cgroup")
CONTROLLERS = (
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "pids",
    "systemd",
)
NETNS = Path("/var/run/netns")


# -- images ---------------------------------------------------------------------


def make_bb_rootfs(root: Path) -> Path:
    """A busybox root filesystem: every applet, root and a user ``dev`` (uid 1000)."""
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "root",
        "home/dev",
        "run",
        "mnt",
        "var/www",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox" and not (root / "bin" / applet).exists():
            (root / "bin" / applet).symlink_to("busybox")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1000:dev:/home/dev:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\ntty:x:5:\ndev:x:1000:\n")
    (root / "var/www/index.html").write_text("hello from bb\n")
    (root / "tmp").chmod(0o1777)
    (root / "root").chmod(0o700)
    os.chown(root / "home/dev", 1000, 1000)
    return root


def import_image(d: Daemon, name: str, tarball: Path) -> None:
    job = wait_job(d, d.call("image.import", name=name, path=str(tarball)), timeout=600)
    assert job["state"] == "done", job


def import_bb(d: Daemon, name: str = BB) -> str:
    """The busybox image ``name`` on ``d``, imported unless it is there already."""
    if any(i["name"] == name for i in d.call("image.list")):
        return name
    with tempfile.TemporaryDirectory(prefix="den-bb-") as tmp:
        rootfs = make_bb_rootfs(Path(tmp) / "rootfs")
        import_image(d, name, tar_dir(rootfs, Path(tmp) / "bb.tar.zst"))
    return name


@pytest.fixture(scope="session")
def bb_image(pool_daemon: Daemon) -> str:
    """The busybox image ``bb`` on the session's pool daemon."""
    return import_bb(pool_daemon)


@pytest.fixture(scope="session")
def debian_image(pool_daemon: Daemon) -> str:
    """Debian bookworm minbase as image ``deb``: from the cached tarball, else built."""
    return str(debian_image_as(pool_daemon, DEB)["name"])


# -- a daemon with a pool of its own ------------------------------------------------


@contextlib.contextmanager
def own_daemon(env: dict[str, str] | None = None, size: str = "4G") -> Iterator[Daemon]:
    """A daemon on a loopback pool of its own, with the bb image, for tests that kill it."""
    with running_daemon(env, pool=size) as d:
        import_bb(d)
        yield d


@pytest.fixture(scope="session")
def spare_daemon() -> Iterator[Daemon]:
    """A second pool daemon of the session (default image bb) for restarts and kills.

    Its SSH port is a fixed one, so that its firewall names the port den listens on.
    """
    env = {
        "DEN_DEFAULT_IMAGE": BB,
        "DEN_RECONCILE_INTERVAL": "0",
        "DEN_SSH_PORT": str(free_port()),
    }
    with own_daemon(env) as d:
        yield d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


# -- backends ------------------------------------------------------------------------

# The microVM cases boot QEMU under TCG here (seconds each): slow.
BACKENDS = ["sandbox", pytest.param("microvm", marks=pytest.mark.slow)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend a parametrised test runs on (a microvm case seeds the pool daemon)."""
    name: str = request.param
    if name == "microvm":
        request.getfixturevalue("pool_microvm")
    return name


# -- users and workspaces ----------------------------------------------------------


class Users:
    """den users made by one test; deleted (with their workspaces) afterwards."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.names: list[str] = []

    def make(self, role: str = "member", **quota: Any) -> str:
        name = f"w{secrets.token_hex(3)}"
        self.d.call("user.create", name=name, role=role, **quota)
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            for ws in list_all(self.d, name):
                with contextlib.suppress(RpcError):
                    self.d.call("workspace.delete", ref=ws["ref"])
            with contextlib.suppress(RpcError):
                self.d.call("user.delete", name=name)


def list_all(d: Daemon, user: str | None = None) -> list[dict[str, Any]]:
    if user is not None:
        try:
            return list(d.call("workspace.list", user=user))
        except RpcError:
            return []
    return list(d.call("workspace.list", all=True))


@pytest.fixture
def users(pool_daemon: Daemon) -> Iterator[Users]:
    u = Users(pool_daemon)
    try:
        yield u
    finally:
        u.cleanup()


def make_users(d: Daemon) -> contextlib.AbstractContextManager[Users]:
    @contextlib.contextmanager
    def cm() -> Iterator[Users]:
        u = Users(d)
        try:
            yield u
        finally:
            u.cleanup()

    return cm()


def create(d: Daemon, owner: str, name: str, image: str = BB, **kw: Any) -> dict[str, Any]:
    ws: dict[str, Any] = d.call("workspace.create", name=name, user=owner, image=image, **kw)
    return ws


def run(d: Daemon, ref: str, *argv: str, **kw: Any) -> dict[str, Any]:
    res: dict[str, Any] = d.call("workspace.exec", ref=ref, argv=list(argv), **kw)
    return res


def sh(d: Daemon, ref: str, script: str, **kw: Any) -> dict[str, Any]:
    return run(d, ref, "sh", "-c", script, **kw)


def ok(d: Daemon, ref: str, script: str, **kw: Any) -> str:
    """Run a shell script in a workspace; it must succeed; return its stdout."""
    res = sh(d, ref, script, **kw)
    assert res["exit_code"] == 0, res
    return str(res["stdout"])


def detach(d: Daemon, ref: str, script: str) -> None:
    """Start ``script`` in the background inside the workspace (it outlives the exec)."""
    inner = script.replace("'", "'\"'\"'")
    ok(d, ref, f"setsid sh -c '{inner}' </dev/null >/dev/null 2>&1 &")


# -- the host side ---------------------------------------------------------------


def cgroup_dir(d: Daemon, controller: str, ws_id: str) -> Path:
    return CGROUP / controller / f"den{d.instance}" / ws_id


def cgroup_pids(d: Daemon, ws_id: str) -> list[int]:
    try:
        text = (cgroup_dir(d, "pids", ws_id) / "cgroup.procs").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def host_uids(pid: int) -> list[int]:
    """Real, effective, saved and fs uid of a host process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return [int(x) for x in line.split()[1:]]
    raise AssertionError(f"no Uid line for {pid}")


def cpu_ns(d: Daemon, ws_id: str) -> int:
    return int((cgroup_dir(d, "cpuacct", ws_id) / "cpuacct.usage").read_text())


def crun_root(d: Daemon) -> Path:
    return Path(f"/run/den/crun{d.instance}")


def crun_state(d: Daemon, ws_id: str) -> dict[str, Any] | None:
    cid = f"den{d.instance}-{ws_id}"
    res = subprocess.run(
        ["crun", "--root", str(crun_root(d)), "state", cid],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        return None
    state: dict[str, Any] = json.loads(res.stdout)
    return state


def init_pid(d: Daemon, ws_id: str) -> int:
    st = crun_state(d, ws_id)
    assert st is not None and st["status"] == "running", st
    return int(st["pid"])


def veth(d: Daemon, ws_id: str) -> str:
    return f"d{d.instance}-{ws_id}"[:15]


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def vm_dir(d: Daemon, ws_id: str) -> Path:
    return d.data_dir / "vms" / ws_id


def tap(d: Daemon, ws_id: str) -> str:
    return f"t{d.instance}-{ws_id}"[:15]


def qemu_pid(d: Daemon, ws_id: str) -> int:
    """The pid of a running microVM's QEMU."""
    return int((vm_dir(d, ws_id) / "qemu.pid").read_text())


def vm_processes(d: Daemon, ws_id: str) -> list[int]:
    """Host processes of a microVM: its QEMU and virtiofsd name its VM directory."""
    mark = f"{vm_dir(d, ws_id)}/".encode()
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if mark in cmd:
                found.append(int(pid))
    return found


def vm_table_has(d: Daemon, ws_id: str) -> bool:
    """The instance's anti-spoofing table still has an element for the VM's TAP."""
    res = subprocess.run(
        ["nft", "list", "table", "bridge", f"den{d.instance}_vm"],
        capture_output=True,
        text=True,
        check=False,
    )
    return res.returncode == 0 and tap(d, ws_id) in res.stdout


def traces(d: Daemon, ws_id: str) -> list[str]:
    """Everything of workspace ``ws_id`` still on the host (empty when it is gone)."""
    n = d.instance
    found = []
    if (crun_root(d) / f"den{n}-{ws_id}").exists():
        found.append("crun container")
    # A microVM's own parts (probed only on a daemon that ever ran one).
    if (d.data_dir / "vms").exists():
        if vm_dir(d, ws_id).exists():
            found.append(str(vm_dir(d, ws_id)))
        if link_exists(tap(d, ws_id)):
            found.append(f"tap {tap(d, ws_id)}")
        found += [f"process {pid}" for pid in vm_processes(d, ws_id)]
        if vm_table_has(d, ws_id):
            found.append("anti-spoofing elements")
    found += [str(cgroup_dir(d, c, ws_id)) for c in CONTROLLERS if cgroup_dir(d, c, ws_id).exists()]
    if (NETNS / f"den{n}-{ws_id}").exists():
        found.append(f"netns den{n}-{ws_id}")
    if link_exists(veth(d, ws_id)):
        found.append(f"veth {veth(d, ws_id)}")
    pool = d.data_dir / "pool"
    for p in (pool / "volumes" / ws_id, pool / "views" / ws_id, d.data_dir / "bundles" / ws_id):
        if p.exists():
            found.append(str(p))
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {ln.split()[4]}" for ln in f if ws_id in ln.split()[4]]
    return found


def instance_ids(d: Daemon) -> dict[str, list[str]]:
    """Workspace ids the instance has anything of on the host -> what it has."""
    n = d.instance
    ids: set[str] = set()
    if crun_root(d).exists():
        ids |= {p.name.removeprefix(f"den{n}-") for p in crun_root(d).iterdir() if p.is_dir()}
    for c in CONTROLLERS:
        parent = CGROUP / c / f"den{n}"
        if parent.is_dir():
            ids |= {p.name for p in parent.iterdir() if p.is_dir()}
    if NETNS.exists():
        ids |= {
            p.name.removeprefix(f"den{n}-")
            for p in NETNS.iterdir()
            if p.name.startswith(f"den{n}-")
        }
    pool = d.data_dir / "pool"
    for parent in (pool / "volumes", pool / "views", d.data_dir / "bundles", d.data_dir / "vms"):
        if parent.exists():
            ids |= {p.name for p in parent.iterdir() if not p.name.startswith(".")}
    out = {i: traces(d, i) for i in ids}
    for link in os.listdir("/sys/class/net"):
        for prefix, kind in ((f"d{n}-", "veth"), (f"t{n}-", "tap")):
            if link.startswith(prefix) and not any(i.startswith(link[len(prefix) :]) for i in ids):
                out[link] = [f"{kind} {link}"]
    return out


def assert_gone(d: Daemon, ws_id: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := traces(d, ws_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"workspace {ws_id} left {left}"


def ns_exec(ns: str, *argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, **kw)


def invalid(d: Daemon, method: str, field: str, **params: object) -> str:
    """Call ``method``; it must refuse with -32602 naming ``field``; return the message."""
    with pytest.raises(RpcError) as info:
        d.call(method, **params)
    err = info.value
    assert err.code == -32602, (method, params, err.code, err.message)
    assert err.data["errors"][0]["field"] == field, err.data
    return str(err.data["errors"][0]["message"])


def wait_for(check: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def wsname() -> str:
    return f"ws{secrets.token_hex(3)}"
