"""The compute manager's calls (vm.*, info, health) over workspaces, and the choice of
backend (workspace.create's backend, default_backend, `den new --backend`).

Through the real daemon and the real CLI; vm.* runs on each backend (the microVM
one is slow: it boots a kernel, emulated where the host has no usable KVM).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest

from den.cli.client import Client, RpcError
from tests.conftest import Daemon, running_daemon
from tests.workspaces.conftest import BB, Users, assert_gone, invalid, ok

VM_FIELDS = {
    "id",
    "name",
    "state",
    "image",
    "resources",
    "mycelium_ip",
    "tap_device",
    "ip_address",
    "created_at",
    "started_at",
    "stopped_at",
}
WHEN = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

BACKENDS = [
    "sandbox",
    pytest.param(
        "microvm",
        marks=[pytest.mark.slow],
    ),
]


def host_link(name: str) -> bool:
    res = subprocess.run(["ip", "link", "show", "dev", name], capture_output=True, check=False)
    return res.returncode == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_vm_lifecycle(
    request: pytest.FixtureRequest, pool_daemon: Daemon, bb_image: str, users: Users, backend: str
) -> None:
    """vm.create -> get/list -> stop -> start -> suspended reads "stopped" -> restart ->
    metrics -> delete, in the compute manager's data model, with its times kept."""
    d = request.getfixturevalue("pool_microvm") if backend == "microvm" else pool_daemon
    owner = users.make()
    vm = d.call(
        "vm.create",
        name="alice-vm",
        image=bb_image,
        cpu_count=1,
        memory_mb=128,
        user=owner,
        backend=backend,
    )
    try:
        assert set(vm) == VM_FIELDS
        assert re.fullmatch(r"[0-9a-f]{12}", vm["id"])
        assert vm["name"] == "alice-vm" and vm["image"] == BB and vm["state"] == "running"
        # the tests' default_disk is 512M: rounded up to whole GiB
        assert vm["resources"] == {"cpu_count": 1, "memory_mb": 128, "disk_gb": 1}
        assert vm["mycelium_ip"] is None
        ws = d.call("workspace.get", ref=f"{owner}/alice-vm")
        assert ws["id"] == vm["id"] and ws["backend"] == backend
        assert vm["ip_address"] == f"{ws['address']}/16"
        if backend == "sandbox":
            assert ws["emulated"] is None and ws["backend_note"] == ""
            assert vm["tap_device"] == f"d{d.instance}-{vm['id']}"[:15]
        else:
            assert vm["tap_device"]
            assert isinstance(ws["emulated"], bool)
            assert ("emulated" in ws["backend_note"]) is ws["emulated"]
        assert host_link(vm["tap_device"]), vm["tap_device"]
        assert WHEN.match(vm["created_at"]) and WHEN.match(vm["started_at"])
        assert vm["stopped_at"] is None
        assert ok(d, f"{owner}/alice-vm", "echo hi") == "hi\n"

        assert d.call("vm.get", vm_id=vm["id"]) == vm
        mine = d.call_as(owner, "vm.list", {})["result"]
        assert [v["id"] for v in mine] == [vm["id"]]
        assert vm["id"] in {v["id"] for v in d.call("vm.list")}  # an admin's: everyone's

        stopped = d.call("vm.stop", vm_id=vm["id"])
        assert stopped["state"] == "stopped" and WHEN.match(stopped["stopped_at"])
        assert stopped["started_at"] == vm["started_at"]
        started = d.call("vm.start", vm_id=vm["id"])
        assert started["state"] == "running" and started["stopped_at"] is None
        assert started["started_at"] >= vm["started_at"]
        assert ok(d, f"{owner}/alice-vm", "echo again") == "again\n"

        d.call("workspace.suspend", ref=f"{owner}/alice-vm")
        suspended = d.call("vm.get", vm_id=vm["id"])
        assert suspended["state"] == "stopped" and suspended["stopped_at"]
        restarted = d.call("vm.restart", vm_id=vm["id"])
        assert restarted["state"] == "running" and restarted["stopped_at"] is None
        assert restarted["started_at"] >= started["started_at"]
        assert isinstance(d.call("vm.metrics.query", vm_id=vm["id"], since="1h"), list)

        events = d.client().call("audit.list", {"method": "vm.restart"})
        assert any(e["target"] == f"workspace:{owner}/alice-vm" for e in events), events
    finally:
        gone = d.call("vm.delete", vm_id=vm["id"])
    assert gone == {"id": vm["id"], "deleted": True}
    assert_gone(d, vm["id"])
    assert not host_link(vm["tap_device"])
    assert d.error("vm.get", vm_id=vm["id"]).code == -32001


def test_vm_rights_and_bad_input(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    """Another member's VM is not found (its owner and name never shown); members make
    their own; bad ids and sizes are -32602 naming the field."""
    d = pool_daemon
    owner, other = users.make(), users.make()
    res = d.call_as(owner, "vm.create", {"name": "mine", "image": bb_image,
                                         "resources": {"cpu_count": 1, "memory_mb": 64}})  # fmt: skip
    vm = res["result"]
    assert vm["resources"]["memory_mb"] == 64 and vm["state"] == "running"
    for method in ("vm.get", "vm.start", "vm.stop", "vm.restart", "vm.delete"):
        err = d.call_as(other, method, {"vm_id": vm["id"]})["error"]
        assert err["code"] == -32001, (method, err)
        assert owner not in err["message"] and "mine" not in err["message"]
    assert d.call_as(other, "vm.list", {})["result"] == []
    assert d.call("vm.get", vm_id=vm["id"])["state"] == "running"  # untouched

    invalid(d, "vm.get", "vm_id", vm_id="../etc")
    invalid(d, "vm.get", "vm_id", vm_id="OWNER/NAME")
    invalid(d, "vm.create", "cpu_count", name="x", cpu_count=0, user=owner)
    invalid(d, "vm.create", "memory_mb", name="x", memory_mb=-5, user=owner)
    msg = invalid(d, "vm.create", "", name="x", memory_mb=64, resources={"memory_mb": 128},
                  user=owner)  # fmt: skip
    assert "memory_mb given twice" in msg
    invalid(d, "vm.create", "backend", name="x", backend="xen", user=owner)
    # user.*: the compute manager's clients name the user user_id
    assert d.error("user.vm", user_id=owner).code == -32001  # accepted: no "default" yet
    invalid(d, "user.vm", "user_id", user_id="Not A Name")
    assert d.call_as(owner, "vm.delete", {"vm_id": vm["id"]})["result"]["deleted"] is True
    assert_gone(d, vm["id"])


def test_info_and_health_are_public(daemon: Daemon) -> None:
    c = Client(url=daemon.http_url, timeout=30)  # no credential at all
    try:
        info = c.call("info", {})
        health = c.call("health", {})
    finally:
        c.close()
    assert info["name"] == "den" and "sandbox" in info["backends"]
    assert info["default_backend"] == "sandbox" and info["version"]
    assert health["status"] == "ok"


def test_create_backend(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    """An unknown backend is -32602 naming the field; without one the default_backend
    (sandbox here) is used; an explicit one is kept."""
    d = pool_daemon
    owner = users.make()
    msg = invalid(d, "workspace.create", "backend", name="x", user=owner, backend="xen")
    assert "sandbox" in msg and "microvm" in msg
    invalid(d, "workspace.create", "backend", name="x", user=owner, backend=7)
    plain = d.call("workspace.create", name="plain", user=owner, image=bb_image)
    assert plain["backend"] == "sandbox" and plain["emulated"] is None
    named = d.call("workspace.create", name="named", user=owner, image=bb_image, backend="sandbox")
    assert named["backend"] == "sandbox"
    for ws in (plain, named):
        d.call("workspace.delete", ref=ws["ref"])
        assert_gone(d, ws["id"])


@pytest.fixture(scope="module")
def microvm_default() -> Iterator[Daemon]:
    """A daemon (no pool: the backend is checked before anything else) whose
    default_backend is microvm."""
    with running_daemon({"DEN_DEFAULT_BACKEND": "microvm"}) as d:
        yield d


def test_default_backend_honoured(microvm_default: Daemon) -> None:
    """default_backend decides a create without --backend: microvm here, which this
    daemon runs without (microvm = false), so the create is refused naming the backend,
    the setting and why; `info` lists only what can start workspaces; an explicit
    sandbox passes the backend check (and fails later: this daemon has no pool)."""
    d = microvm_default
    d.call("user.create", name="ann")
    info = d.call("info")
    assert info["default_backend"] == "microvm" and info["backends"] == ["sandbox"]
    err = d.error("workspace.create", name="x", user="ann")
    assert err.code == -32602, err.message
    (why,) = err.data["errors"]
    assert why["field"] == "backend"
    assert "'microvm'" in why["message"] and "default_backend" in why["message"]
    assert "microvm = false" in why["message"] and "--backend sandbox" in why["message"]
    err = d.error("workspace.create", name="x", user="ann", backend="sandbox")
    assert err.code != -32602 and "pool" in err.message, (err.code, err.message)


def test_den_new_backend_cli(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    """`den new NAME --backend sandbox` through the real CLI; `den show` prints the
    backend; a backend den does not have is a usage error listing the choices."""
    d = pool_daemon
    owner = users.make()
    res = d.cli("new", "clinew", "--backend", "sandbox", "--image", bb_image, "--json",
                user=owner)  # fmt: skip
    assert res.returncode == 0, res.stderr
    ws = json.loads(res.stdout)
    try:
        assert ws["backend"] == "sandbox" and ws["state"] == "running"
        shown = d.cli("show", "clinew", user=owner)
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"^\s*backend\s+sandbox\s*$", shown.stdout, re.M), shown.stdout
        bad = d.cli("new", "other", "--backend", "xen", user=owner)
        assert bad.returncode == 2 and "microvm" in bad.stderr and "sandbox" in bad.stderr
        help_ = d.cli("new", "--help")
        assert "--backend" in help_.stdout and "default_backend" in help_.stdout
    finally:
        d.call("workspace.delete", ref=ws["ref"])
    assert_gone(d, ws["id"])
    with pytest.raises(RpcError):
        d.call("workspace.get", ref=ws["ref"])
