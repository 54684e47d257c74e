"""Workspace lifecycle: create, list/get, exec, stop/start, restart, suspend/resume,
rename, clone, delete; bad input; rights; quotas; the compute-manager aliases.

Real crun, real btrfs, real network namespaces; every test deletes what it made
and checks that nothing of a deleted workspace is left on the host.

The tests of behaviour through den's API run on both backends (``backend``). A
microVM boots under TCG here (seconds each), so its cases share one microVM of
the module (:class:`SharedVM`) instead of making their own; the last two tests
delete it (made again only when needed). Boots: create, clone, start, restart x2,
start after the suspend test's stop, the second life of the shared VM: seven.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon
from tests.workspaces.conftest import (
    BB,
    Users,
    assert_gone,
    cgroup_dir,
    cgroup_pids,
    cpu_ns,
    create,
    crun_state,
    detach,
    init_pid,
    instance_ids,
    list_all,
    make_users,
    ok,
    qemu_pid,
    run,
    sh,
    traces,
    vm_processes,
    wait_for,
)

FIELDS = {
    "id",
    "ref",
    "owner",
    "name",
    "state",
    "state_reason",
    "image",
    "backend",
    "emulated",
    "backend_note",
    "address",
    "cpu",
    "memory_mb",
    "pids",
    "disk_mb",
    "created_at",
    "last_activity_at",
    "last_activity_kind",
    "dotfiles_url",
    "dotfiles_state",
    "dotfiles_log",
    "url",
    "urls",
    "busy_until",
}
# The shared microVM's size: a whole vCPU (a TCG boot needs it), memory for its kernel.
VM_CPU, VM_MEM_MB, VM_PIDS = 1.0, 256, 128


class SharedVM:
    """The module's microVM, for the microvm cases that need no fresh one: each TCG
    boot costs seconds. A test may stop, suspend or delete it; :meth:`running`
    brings it back (a boot only when it is stopped or gone)."""

    def __init__(self, d: Daemon, owner: str) -> None:
        self.d = d
        self.owner = owner
        self.ref = f"{owner}/vm"

    def running(self) -> dict[str, Any]:
        try:
            ws: dict[str, Any] = self.d.call("workspace.get", ref=self.ref)
        except RpcError as exc:
            assert exc.code == -32001, exc
            return create(
                self.d, self.owner, "vm", backend="microvm",
                cpu=VM_CPU, mem=f"{VM_MEM_MB}M", pids=VM_PIDS,
            )  # fmt: skip
        if ws["state"] == "suspended":
            return dict(self.d.call("workspace.resume", ref=self.ref))
        if ws["state"] != "running":
            return dict(self.d.call("workspace.start", ref=self.ref))
        return ws


@pytest.fixture(scope="module")
def shared_vm(pool_microvm: Daemon, bb_image: str) -> Iterator[SharedVM]:
    with make_users(pool_microvm) as users:
        yield SharedVM(pool_microvm, users.make())


def subject(
    request: pytest.FixtureRequest, backend: str, users: Users, name: str, **kw: Any
) -> tuple[str, dict[str, Any]]:
    """(owner, workspace) a test works on: a new sandbox workspace ``name`` of a new
    user made with ``kw``, or the module's shared microVM, running."""
    d: Daemon = request.getfixturevalue("pool_daemon")
    if backend == "microvm":
        vm: SharedVM = request.getfixturevalue("shared_vm")
        return vm.owner, vm.running()
    owner = users.make()
    return owner, create(d, owner, name, **kw)


def release(d: Daemon, ws: dict[str, Any]) -> None:
    """Delete a test's own workspace (nothing of it may be left); the shared microVM stays."""
    if ws["backend"] == "sandbox":
        d.call("workspace.delete", ref=ws["ref"])
        assert_gone(d, ws["id"])


def workspace_pid(d: Daemon, ws: dict[str, Any]) -> int:
    """The host process a workspace is: the sandbox's init, a microVM's QEMU."""
    return init_pid(d, ws["id"]) if ws["backend"] == "sandbox" else qemu_pid(d, ws["id"])


def host_pids() -> int:
    from den.backends.microvm.backend import HOST_PIDS

    return HOST_PIDS


def memory_limit(d: Daemon, ws: dict[str, Any]) -> int:
    """What the workspace's cgroup must allow: its memory, plus QEMU's own for a microVM."""
    mem = int(ws["memory_mb"])
    if ws["backend"] == "microvm":
        from den.backends.microvm.backend import OVERHEAD_MB

        mem += OVERHEAD_MB["tcg" if ws["emulated"] else "kvm"]
    return mem << 20


def test_create_returns_running_and_exec_works(
    pool_daemon: Daemon, bb_image: str, users: Users, backend: str, request: pytest.FixtureRequest
) -> None:
    d = pool_daemon
    owner, ws = subject(request, backend, users, "web", cpu=0.5, mem="128M", pids=128)
    size = (0.5, 128, 128) if backend == "sandbox" else (VM_CPU, VM_MEM_MB, VM_PIDS)
    try:
        assert ws["state"] == "running"
        assert ws["ref"] == f"{owner}/{ws['name']}" and ws["owner"] == owner
        assert ws["image"] == BB and ws["backend"] == backend
        assert (ws["cpu"], ws["memory_mb"], ws["pids"]) == size
        assert ws["address"].startswith(f"10.{77 + d.instance}.")
        # No wait: create returns once exec works.
        res = run(d, ws["ref"], "echo", "hello")
        assert res == {
            "exit_code": 0,
            "stdout": "hello\n",
            "stderr": "",
            "timed_out": False,
            "truncated": False,
        }
        assert ok(d, ws["ref"], "hostname") == f"{ws['name']}\n"
        assert ws["address"] in ok(d, ws["ref"], "ip -4 addr show eth0")
        # argv, env, cwd, stdin, exit codes, timeout, user inside.
        res = run(
            d,
            ws["ref"],
            "sh",
            "-c",
            'echo "$FOO:$(pwd)"; cat; exit 3',
            env={"FOO": "bar"},
            cwd="/tmp",
            stdin="from stdin\n",
        )
        assert res["exit_code"] == 3 and res["stdout"] == "bar:/tmp\nfrom stdin\n", res
        res = run(d, ws["ref"], "sleep", "30", timeout=0.5)
        assert res["timed_out"] and res["exit_code"] != 0, res
        # A process left in the background keeps the output pipes open: exec
        # still returns when the command ends, and its timeout still holds.
        t0 = time.monotonic()
        res = run(d, ws["ref"], "sh", "-c", "sleep 60 & echo started")
        assert res["exit_code"] == 0 and res["stdout"] == "started\n", res
        res = run(d, ws["ref"], "sh", "-c", "sleep 60 & sleep 60", timeout=1)
        assert res["timed_out"], res
        assert time.monotonic() - t0 < 10
        ok(d, ws["ref"], "kill $(ps -o pid,args | awk '$2 == \"sleep\" && $3 == 60 {print $1}')")
        # Past the pipe buffer, within exec_max_output (1 MiB; past it see
        # tests/workspaces/escape/test_resources.py).
        big = ok(d, ws["ref"], "head -c 1000000 /dev/zero | tr '\\0' a")
        assert len(big) == 1_000_000 and set(big) == {"a"}
        res = run(d, ws["ref"], "sh", "-c", "cat | wc -c", stdin="x" * 1_000_000)
        assert res["stdout"].strip() == "1000000", res
        assert ok(d, ws["ref"], "id -u; echo $HOME", user="dev") == "1000\n/home/dev\n"
        res = run(d, ws["ref"], "no-such-program")
        assert res["exit_code"] == 127, res
        res = run(d, ws["ref"], "/etc/passwd")
        assert res["exit_code"] == 126, res
        # The limits are the cgroup's (a microVM's: of its QEMU and virtiofsd, whose
        # threads a fixed cap guards: the guest's own kernel counts its processes).
        pids_max = int((cgroup_dir(d, "pids", ws["id"]) / "pids.max").read_text())
        assert pids_max == (size[2] if backend == "sandbox" else host_pids())
        mem = int((cgroup_dir(d, "memory", ws["id"]) / "memory.limit_in_bytes").read_text())
        assert mem == memory_limit(d, ws)
        quota = int((cgroup_dir(d, "cpu", ws["id"]) / "cpu.cfs_quota_us").read_text())
        period = int((cgroup_dir(d, "cpu", ws["id"]) / "cpu.cfs_period_us").read_text())
        assert quota / period == pytest.approx(size[0])
        if backend == "microvm":  # the guest has the memory asked for, its own kernel's view
            total_kb = int(ok(d, ws["ref"], "awk '/MemTotal/ {print $2}' /proc/meminfo"))
            assert (VM_MEM_MB - 56) << 10 < total_kb <= VM_MEM_MB << 10, total_kb
            assert qemu_pid(d, ws["id"]) in cgroup_pids(d, ws["id"])
        # list and get
        got = d.call("workspace.get", ref=ws["ref"])
        assert set(got) == FIELDS
        assert got["id"] == ws["id"] and got["state"] == "running"
        assert got["last_activity_kind"] == "exec" and got["last_activity_at"]
        listed = d.call("workspace.list", user=owner)
        assert [w["ref"] for w in listed] == [ws["ref"]]
        assert ws["ref"] in {w["ref"] for w in d.call("workspace.list", all=True)}
        res = d.cli("exec", ws["ref"], "--", "echo", "via", "cli")
        assert res.returncode == 0 and "via cli" in res.stdout, res
        res = d.cli("show", ws["ref"], "--json")
        assert res.returncode == 0 and ws["id"] in res.stdout, res
    finally:
        release(d, ws)
    if backend == "sandbox":
        assert d.call("workspace.list", user=owner) == []


def test_clone_copies_files_independently(
    pool_daemon: Daemon, bb_image: str, users: Users, backend: str, request: pytest.FixtureRequest
) -> None:
    d = pool_daemon
    owner, src = subject(request, backend, users, "src")
    ok(d, src["ref"], "echo original > /root/f; echo code > /code/f")
    cp = d.call("workspace.clone", source=src["ref"], name="copy")
    try:
        assert cp["state"] == "running" and cp["owner"] == owner and cp["id"] != src["id"]
        assert cp["address"] != src["address"] and cp["image"] == src["image"]
        assert cp["backend"] == backend
        assert ok(d, cp["ref"], "cat /root/f /code/f") == "original\ncode\n"
        ok(d, cp["ref"], "echo changed > /root/f; echo only-copy > /root/g")
        ok(d, src["ref"], "echo src-only > /root/h")
        assert ok(d, src["ref"], "cat /root/f; ls /root") == "original\nf\nh\n"
        assert ok(d, cp["ref"], "cat /root/f; ls /root") == "changed\nf\ng\n"
        err = d.error("workspace.clone", source=src["ref"], name="copy")
        assert err.code == -32002
        err = d.error("workspace.clone", source=f"{owner}/missing", name="other")
        assert err.code == -32001
        ok(d, src["ref"], "rm /root/f /root/h /code/f")
    finally:
        d.call("workspace.delete", ref=cp["ref"])
        release(d, src)
    assert_gone(d, cp["id"], timeout=15)


def test_rename(
    pool_daemon: Daemon, bb_image: str, users: Users, backend: str, request: pytest.FixtureRequest
) -> None:
    d = pool_daemon
    owner, ws = subject(request, backend, users, "old")
    other = create(d, owner, "taken")
    ok(d, ws["ref"], "echo mine > /root/f")
    out = d.call("workspace.rename", ref=ws["ref"], new_name="new")
    assert out["ref"] == f"{owner}/new" and out["id"] == ws["id"] and out["state"] == "running"
    assert d.error("workspace.get", ref=ws["ref"]).code == -32001
    assert ok(d, f"{owner}/new", "cat /root/f") == "mine\n"
    err = d.error("workspace.rename", ref=f"{owner}/new", new_name="taken")
    assert err.code == -32002
    assert d.error("workspace.rename", ref=f"{owner}/new", new_name="Bad Name").code == -32602
    d.call("workspace.rename", ref=f"{owner}/new", new_name=ws["name"])
    ok(d, ws["ref"], "rm /root/f")
    release(d, ws)
    d.call("workspace.delete", ref=other["ref"])
    assert_gone(d, other["id"])


def test_names_unique_per_owner(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    a, b = users.make(), users.make()
    wa = create(d, a, "same")
    wb = create(d, b, "same")  # another owner may use the name
    before = instance_ids(d)
    err = d.error("workspace.create", name="same", user=a, image=BB)
    assert err.code == -32002 and "same" in err.message
    assert instance_ids(d) == before
    assert [w["id"] for w in list_all(d, a)] == [wa["id"]]
    assert wa["address"] != wb["address"]


def test_concurrent_creates_all_succeed_with_their_own_addresses(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    """Creates for different owners race for addresses: a lost race is retried, never
    an internal error (a rolled-back retry once left the owner's row unreadable)."""
    from concurrent.futures import ThreadPoolExecutor

    d = pool_daemon
    owners = [users.make() for _ in range(6)]
    with ThreadPoolExecutor(len(owners)) as pool:
        made = list(pool.map(lambda o: create(d, o, "race"), owners))
    assert [w["state"] for w in made] == ["running"] * len(owners)
    assert len({w["address"] for w in made}) == len(owners)


HOSTILE = [
    "../etc",
    "A",
    "a b",
    "x" * 40,
    "a;rm -rf /",
    "-a",
    "",
    "a/b",
    "9lives",
    "é",
    "a\nb",
    "a_b",
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_names_refused(pool_daemon: Daemon, bb_image: str, users: Users, bad: str) -> None:
    d = pool_daemon
    owner = users.make()
    before = instance_ids(d)
    err = d.error("workspace.create", name=bad, user=owner, image=BB)
    assert err.code == -32602, err
    assert list_all(d, owner) == []
    assert instance_ids(d) == before


def absurd_cases(owner: str) -> list[tuple[dict[str, Any], int, str]]:
    return [
        ({"image": "no-such-image"}, -32001, "no-such-image"),
        ({"image": "../images"}, -32602, ""),
        ({"user": "nobody-here"}, -32001, "nobody-here"),
        ({"cpu": 1000}, -32602, "cpu"),
        ({"cpu": 0}, -32602, "cpu"),
        ({"cpu": -1}, -32602, "cpu"),
        ({"mem": "1T"}, -32602, "mem"),
        ({"mem": "1K"}, -32602, "mem"),
        ({"mem": "lots"}, -32602, "mem"),
        ({"mem": "-5M"}, -32602, "mem"),
        ({"pids": 1}, -32602, "pids"),
        ({"pids": -1}, -32602, "pids"),
        ({"pids": 10**12}, -32602, "pids"),
    ]


def test_bad_input_leaves_nothing(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    owner = users.make()
    volumes = d.data_dir / "pool" / "volumes"
    for params, code, word in absurd_cases(owner):
        before_ids, before_vols = instance_ids(d), set(volumes.iterdir())
        call = {"name": "bad", "user": owner, "image": BB, **params}
        err = d.error("workspace.create", **call)
        assert err.code == code, (params, err)
        text = err.message + str(err.data or "")
        assert word in text, (params, text)
        assert list_all(d, owner) == [], params
        assert set(volumes.iterdir()) == before_vols, params
        assert instance_ids(d) == before_ids, params
    for ref in ("../etc", "a/b/c", f"{owner}/", "/x", "A/b", f"{owner}/x;id", "x" * 100):
        for method in ("workspace.get", "workspace.delete", "workspace.stop"):
            assert d.error(method, ref=ref).code == -32602, (method, ref)
        assert d.error("workspace.exec", ref=ref, argv=["id"]).code == -32602, ref
    assert d.error("workspace.get", ref=f"{owner}/nothing").code == -32001


def test_image_without_init_program_leaves_nothing(
    pool_daemon: Daemon, bb_image: str, users: Users, tmp_path: Any
) -> None:
    """An image in which the workspace cannot run (no `sleep`) is refused cleanly."""
    from tests.storage.conftest import tar_dir
    from tests.workspaces.conftest import import_image

    d = pool_daemon
    root = tmp_path / "rootfs"
    for sub in ("etc", "root", "tmp", "bin"):
        (root / sub).mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    name = f"empty{time.monotonic_ns() % 10**6}"
    import_image(d, name, tar_dir(root, tmp_path / "empty.tar.zst"))
    owner = users.make()
    before = instance_ids(d)
    try:
        try:
            ws = d.call("workspace.create", name="hollow", user=owner, image=name)
        except RpcError as exc:  # refused: nothing may be left
            assert exc.code == -32005, exc
            assert list_all(d, owner) == []
            assert instance_ids(d) == before
        else:
            # Accepted: then it must really run (create promises exec works).
            assert ws["state"] == "running"
            res = run(d, ws["ref"], "/bin/true")
            pytest.fail(f"create said running for an image with no programs; exec gave {res}")
    finally:
        for w in list_all(d, owner):
            d.call("workspace.delete", ref=w["ref"])
        d.call("image.delete", name=name)


def test_stop_start_keeps_files_and_ends_processes(
    pool_daemon: Daemon, bb_image: str, users: Users, backend: str, request: pytest.FixtureRequest
) -> None:
    d = pool_daemon
    _, ws = subject(request, backend, users, "keep")
    ref, wid = ws["ref"], ws["id"]
    ok(d, ref, "echo kept > /root/file; echo code > /code/c; mkdir -p /home/dev/x")
    detach(d, ref, "sleep 1000")
    assert wait_for(lambda: "sleep 1000" in ok(d, ref, "ps -o args"))
    # sandbox: init, sh, sleep; microVM: QEMU and its two virtiofsd
    assert wait_for(lambda: len(cgroup_pids(d, wid)) >= 3)
    address = ws["address"]

    out = d.call("workspace.stop", ref=ref)
    assert out["state"] == "stopped"
    assert cgroup_pids(d, wid) == []
    assert crun_state(d, wid) is None
    assert vm_processes(d, wid) == []
    err = d.error("workspace.exec", ref=ref, argv=["true"])
    assert err.code == -32002 and "stopped" in err.message
    assert d.call("workspace.stop", ref=ref)["state"] == "stopped"  # idempotent

    out = d.call("workspace.start", ref=ref)
    assert out["state"] == "running" and out["address"] == address
    assert ok(d, ref, "cat /root/file /code/c; ls -d /home/dev/x") == "kept\ncode\n/home/dev/x\n"
    assert "sleep 1000" not in ok(d, ref, "ps -o args")
    assert d.call("workspace.start", ref=ref)["state"] == "running"  # idempotent

    pid = workspace_pid(d, ws)
    out = d.call("workspace.restart", ref=ref)
    assert out["state"] == "running"
    assert workspace_pid(d, ws) != pid
    assert ok(d, ref, "cat /root/file") == "kept\n"
    d.call("workspace.stop", ref=ref)
    assert d.call("workspace.restart", ref=ref)["state"] == "running"  # restart of a stopped one
    assert ok(d, ref, "echo up") == "up\n"
    ok(d, ref, "rm -r /root/file /code/c /home/dev/x")
    release(d, ws)


def test_suspend_stops_cpu_and_resume_continues(
    pool_daemon: Daemon, bb_image: str, users: Users, backend: str, request: pytest.FixtureRequest
) -> None:
    """The workspace's cgroup's CPU time: the sandbox's processes, or the microVM's
    QEMU (whose paused main loop and idle virtiofsd may take a few ms)."""
    d = pool_daemon
    _, ws = subject(request, backend, users, "busy", cpu=0.5)
    ref, wid = ws["ref"], ws["id"]
    idle = 0.005 if backend == "sandbox" else 0.05
    try:
        detach(d, ref, "echo $$ > /tmp/loop.pid; while :; do :; done")
        loop_pid = wait_for(lambda: ok(d, ref, "cat /tmp/loop.pid 2>/dev/null || true").strip())
        assert loop_pid

        def used(seconds: float = 1.0) -> float:
            a = cpu_ns(d, wid)
            time.sleep(seconds)
            return (cpu_ns(d, wid) - a) / 1e9

        assert used() > 0.1, "the busy loop should use CPU while running"
        out = d.call("workspace.suspend", ref=ref)
        assert out["state"] == "suspended"
        if backend == "sandbox":
            assert (cgroup_dir(d, "freezer", wid) / "freezer.state").read_text().strip() == "FROZEN"
        assert used() < idle, "a suspended workspace must use no CPU"
        assert d.call("workspace.get", ref=ref)["state"] == "suspended"
        assert d.call("workspace.suspend", ref=ref)["state"] == "suspended"  # idempotent

        out = d.call("workspace.resume", ref=ref)
        assert out["state"] == "running"
        assert used() > 0.1, "the same loop continues after resume"
        ps = ok(d, ref, "ps -o pid,args")
        assert any(line.split()[0] == loop_pid for line in ps.splitlines()[1:]), ps

        # exec on a suspended workspace resumes it transparently
        d.call("workspace.suspend", ref=ref)
        assert ok(d, ref, "cat /tmp/loop.pid").strip() == loop_pid
        assert d.call("workspace.get", ref=ref)["state"] == "running"
        if backend == "sandbox":
            assert (cgroup_dir(d, "freezer", wid) / "freezer.state").read_text().strip() == "THAWED"
        else:
            assert used() > 0.1, "the guest's loop runs again"

        # stop from suspended ends everything
        d.call("workspace.suspend", ref=ref)
        assert d.call("workspace.stop", ref=ref)["state"] == "stopped"
        assert cgroup_pids(d, wid) == []
        err = d.error("workspace.suspend", ref=ref)
        assert err.code == -32002
        err = d.error("workspace.resume", ref=ref)
        assert err.code == -32002
    finally:
        release(d, ws)


def test_member_rights(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    alice, bob = users.make(), users.make()
    res = d.call_as(alice, "workspace.create", {"name": "mine", "image": BB, "mem": "64M"})
    assert "result" in res, res
    ws = res["result"]
    assert ws["ref"] == f"{alice}/mine"
    res = d.call_as(alice, "workspace.exec", {"ref": "mine", "argv": ["echo", "hi"]})
    assert res["result"]["stdout"] == "hi\n", res
    listed = d.call_as(alice, "workspace.list", {"all": True})["result"]
    assert [w["ref"] for w in listed] == [ws["ref"]]
    for method, params in (
        ("workspace.get", {"ref": f"{alice}/mine"}),
        ("workspace.exec", {"ref": f"{alice}/mine", "argv": ["id"]}),
        ("workspace.stop", {"ref": f"{alice}/mine"}),
        ("workspace.delete", {"ref": f"{alice}/mine"}),
        ("workspace.clone", {"source": f"{alice}/mine", "name": "stolen"}),
        ("workspace.rename", {"ref": f"{alice}/mine", "new_name": "x"}),
    ):
        res = d.call_as(bob, method, params)
        assert res.get("error", {}).get("code") == -32001, (method, res)
    res = d.call_as(bob, "workspace.create", {"name": "x", "user": alice, "image": BB})
    assert res.get("error", {}).get("code") in (-32001, -32003), res
    assert d.call_as(bob, "workspace.list", {"all": True})["result"] == []
    assert d.call_as(bob, "workspace.list", {"user": alice}).get("error", {}).get("code") == -32001
    # the admin reaches it as OWNER/NAME
    assert d.call("workspace.get", ref=f"{alice}/mine")["id"] == ws["id"]
    assert ok(d, f"{alice}/mine", "echo admin") == "admin\n"
    assert d.error("workspace.get", ref="mine").code == -32602  # root owns no workspaces
    assert d.call_as(alice, "workspace.delete", {"ref": "mine"})["result"] == {"deleted": ws["ref"]}
    assert_gone(d, ws["id"])


def test_quotas_name_the_limit(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    owner = users.make()
    d.call("user.update", name=owner, max_workspaces=1)
    first = create(d, owner, "one", cpu=0.5, mem="64M")
    before = instance_ids(d)
    err = d.error("workspace.create", name="two", user=owner, image=BB)
    assert err.code == -32004
    assert "max_workspaces" in err.message and "1" in err.message, err.message
    err = d.error("workspace.clone", source=first["ref"], name="two")
    assert err.code == -32004 and "max_workspaces" in err.message
    assert instance_ids(d) == before and len(list_all(d, owner)) == 1

    d.call("user.update", name=owner, max_workspaces=-1, max_cpu=1)
    err = d.error("workspace.create", name="two", user=owner, image=BB, cpu=1, mem="64M")
    assert err.code == -32004
    assert "max_cpu" in err.message and "0.5" in err.message, err.message
    second = create(d, owner, "two", cpu=0.5, mem="64M")  # exactly at the limit

    d.call("user.update", name=owner, max_cpu=-1, max_memory_mb=160)
    err = d.error("workspace.create", name="three", user=owner, image=BB, cpu=0.1, mem="64M")
    assert err.code == -32004
    assert "max_memory_mb" in err.message and "128" in err.message, err.message
    assert set(instance_ids(d)) == set(before) | {second["id"]}
    assert len(list_all(d, owner)) == 2
    d.call("user.update", name=owner, max_memory_mb=-1)
    third = create(d, owner, "three", cpu=0.1, mem="64M")
    for ws in (first, second, third):
        d.call("workspace.delete", ref=ws["ref"])
        assert_gone(d, ws["id"])


def test_compute_manager_aliases(spare_daemon: Daemon) -> None:
    d = spare_daemon
    with make_users(d) as users:
        owner = users.make()
        ws = d.call("user.provision", user=owner)
        assert ws["name"] == "default" and ws["state"] == "running" and ws["image"] == BB
        assert d.call("user.provision", user=owner)["id"] == ws["id"]  # idempotent
        assert d.call("user.vm", user=owner)["id"] == ws["id"]
        assert ok(d, f"{owner}/default", "echo ok") == "ok\n"
        assert d.call("user.stop", user=owner)["state"] == "stopped"
        assert d.call("user.vm", user=owner)["state"] == "stopped"
        assert d.call("user.start", user=owner)["state"] == "running"
        res = d.call_as(owner, "user.vm", {})
        assert res["result"]["id"] == ws["id"], res
        assert d.call("user.deprovision", user=owner) == {"deleted": f"{owner}/default"}
        assert_gone(d, ws["id"])
        assert d.error("user.vm", user=owner).code == -32001
        # a member provisions their own
        res = d.call_as(owner, "user.provision", {})
        assert res["result"]["owner"] == owner, res
        assert d.call_as(owner, "user.deprovision", {})["result"]["deleted"] == f"{owner}/default"
        assert_gone(d, res["result"]["id"])


def test_user_with_workspaces_cannot_be_deleted(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "stays")
    err = d.error("user.delete", name=owner)
    assert err.code == -32002 and "stays" in err.message, err
    assert d.call("workspace.get", ref=ws["ref"])["state"] == "running"
    assert ok(d, ws["ref"], "echo still") == "still\n"
    d.call("workspace.delete", ref=ws["ref"])
    assert_gone(d, ws["id"])


def test_exec_user_and_bad_user(
    pool_daemon: Daemon, bb_image: str, users: Users, backend: str, request: pytest.FixtureRequest
) -> None:
    d = pool_daemon
    _, ws = subject(request, backend, users, "users")
    try:
        assert ok(d, ws["ref"], "id -u", user="1000") == "1000\n"
        err = d.error("workspace.exec", ref=ws["ref"], argv=["id"], user="nobody-inside")
        assert err.code == -32602
        assert sh(d, ws["ref"], "touch /root/x", user="dev")["exit_code"] != 0
    finally:
        release(d, ws)


# The last two delete the shared microVM (the second makes it again).


def test_delete_of_suspended_workspace(
    pool_daemon: Daemon, bb_image: str, users: Users, backend: str, request: pytest.FixtureRequest
) -> None:
    d = pool_daemon
    _, ws = subject(request, backend, users, "frozen")
    detach(d, ws["ref"], "sleep 1000")
    d.call("workspace.suspend", ref=ws["ref"])
    assert d.call("workspace.delete", ref=ws["ref"]) == {"deleted": ws["ref"]}
    assert_gone(d, ws["id"], timeout=15)
    err = d.error("workspace.get", ref=ws["ref"])
    assert err.code == -32001


def test_delete_removes_everything(
    pool_daemon: Daemon, bb_image: str, users: Users, backend: str, request: pytest.FixtureRequest
) -> None:
    """Nothing of it is left: the sandbox's container, cgroup, netns, veth, volume and
    views; a microVM's QEMU and virtiofsd, VM directory, TAP, cgroup, volume."""
    d = pool_daemon
    owner, ws = subject(request, backend, users, "gone")
    wid = ws["id"]
    detach(d, ws["ref"], "sleep 1000")
    assert traces(d, wid)  # the probe sees a live workspace
    if backend == "microvm":
        found = " ".join(traces(d, wid))
        assert all(w in found for w in ("/vms/", "tap ", "process ", "anti-spoofing")), found
    image = d.data_dir / "pool" / "images" / BB
    assert d.call("workspace.delete", ref=ws["ref"]) == {"deleted": ws["ref"]}
    assert_gone(d, wid, timeout=15)
    assert image.is_dir()  # the image stays
    assert d.error("workspace.delete", ref=ws["ref"]).code == -32001
    assert d.error("workspace.exec", ref=ws["ref"], argv=["true"]).code == -32001
    # the address is free again (a sandbox: what frees it is not the backend's)
    again = create(d, owner, ws["name"])
    try:
        assert again["id"] != wid
    finally:
        d.call("workspace.delete", ref=again["ref"])
    assert_gone(d, again["id"])


def test_daemon_stops_at_once_while_the_pool_gives_space_back(spare_daemon: Daemon) -> None:
    """Deletes start a wait for btrfs's cleaner (then the pool is trimmed); a stop
    meanwhile ends that wait instead of waiting for the cleaner, which once held
    ``den serve`` for the whole of its stop timeout and got it killed."""
    d = spare_daemon
    with make_users(d) as users:
        owner = users.make()
        for name in ("gone1", "gone2"):
            create(d, owner, name)
        for name in ("gone1", "gone2"):
            d.call("workspace.delete", ref=f"{owner}/{name}")
        started = time.monotonic()
        rc = d.stop(timeout=15)
        took = time.monotonic() - started
        d.start()
    assert rc == 0, f"den serve did not end by itself on SIGTERM (rc {rc}, {took:.1f}s)"
    # Not by giving up on a busy thread either (den.daemon.STOP_THREADS_SECONDS).
    assert took < 5, f"den serve took {took:.1f}s to stop"
    assert "still busy" not in d.log_text()
