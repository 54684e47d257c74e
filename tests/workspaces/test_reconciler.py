"""The reconciler: a daemon restart keeps workspaces as they were; a ``kill -9``
of the daemon during a create or a delete, then a start, leaves no orphan, no
lost workspace and no duplicate address; drift and orphans are repaired."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon
from tests.workspaces.conftest import (
    NETNS,
    Users,
    assert_gone,
    cgroup_dir,
    cgroup_pids,
    create,
    crun_state,
    detach,
    init_pid,
    instance_ids,
    list_all,
    make_users,
    ok,
    traces,
    wait_for,
)


def ns_address(d: Daemon, ws_id: str) -> str:
    out = subprocess.run(
        ["ip", "-n", f"den{d.instance}-{ws_id}", "-4", "-o", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
    ).stdout
    return out.split()[3].split("/")[0] if out.strip() else ""


def assert_clean(d: Daemon) -> list[dict[str, Any]]:
    """Every row is healthy and owns its host parts; nothing on the host lacks a row."""
    rows = list_all(d)
    ids = {w["id"] for w in rows}
    for _ in range(2):  # once at once, once after anything late had time to appear
        strays = {k: v for k, v in instance_ids(d).items() if k not in ids and v}
        strays = {k: v for k, v in strays.items() if not any(i.startswith(k) for i in ids)}
        assert not strays, f"orphans on the host: {strays}"
        time.sleep(0.3)
    addresses = Counter(w["address"] for w in rows)
    assert all(c == 1 for c in addresses.values()), addresses
    for w in rows:
        assert w["state"] == "running", w
        assert ok(d, w["ref"], "echo alive") == "alive\n"
        assert ns_address(d, w["id"]) == w["address"]
    return rows


def test_restart_keeps_workspaces_as_they_were(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make()
    running = create(d, owner, "running")
    frozen = create(d, owner, "frozen")
    stopped = create(d, owner, "stopped")
    detach(d, running["ref"], "echo $$ > /tmp/pid; exec sleep 1000")
    pid = init_pid(d, running["id"])
    inner = wait_for(lambda: ok(d, running["ref"], "cat /tmp/pid 2>/dev/null || true").strip())
    frozen_pid = init_pid(d, frozen["id"])
    d.call("workspace.suspend", ref=frozen["ref"])
    assert (crun_state(d, frozen["id"]) or {}).get("status") == "paused"
    d.call("workspace.stop", ref=stopped["ref"])

    d.restart()

    assert init_pid(d, running["id"]) == pid
    ps = ok(d, running["ref"], "ps -o pid,args")
    assert any(ln.split()[0] == inner and "sleep 1000" in ln for ln in ps.splitlines()[1:]), ps
    assert d.call("workspace.get", ref=frozen["ref"])["state"] == "suspended"
    assert (
        cgroup_dir(d, "freezer", frozen["id"]) / "freezer.state"
    ).read_text().strip() == "FROZEN"
    assert (crun_state(d, frozen["id"]) or {}).get("pid") == frozen_pid
    assert d.call("workspace.get", ref=stopped["ref"])["state"] == "stopped"
    assert crun_state(d, stopped["id"]) is None
    for w in (running, frozen, stopped):
        d.call("workspace.delete", ref=w["ref"])
        assert_gone(d, w["id"])


def test_reconciler_repairs_drift_and_removes_orphans(spare_daemon: Daemon) -> None:
    d = spare_daemon
    n = d.instance
    fake = "0rphan0rphan"
    with make_users(d) as users:
        owner = users.make()
        ws = create(d, owner, "drift")
        stopped = create(d, owner, "halted")
        d.call("workspace.stop", ref=stopped["ref"])
        d.stop()
        # While the daemon is down: the workspace's processes die, and stray pieces
        # with no record appear (a netns, a cgroup, a volume directory).
        os.kill(init_pid(d, ws["id"]), signal.SIGKILL)
        assert wait_for(lambda: not cgroup_pids(d, ws["id"]), timeout=5)
        subprocess.run(["ip", "netns", "add", f"den{n}-{fake}"], check=True)
        (cgroup_dir(d, "pids", fake)).mkdir(parents=True)
        (d.data_dir / "pool" / "volumes" / fake).mkdir()
        try:
            d.start()
            assert init_pid(d, ws["id"]) > 0
            assert ok(d, ws["ref"], "echo back") == "back\n"
            assert d.call("workspace.get", ref=stopped["ref"])["state"] == "stopped"
            assert crun_state(d, stopped["id"]) is None
            assert traces(d, fake) == []
        finally:
            subprocess.run(["ip", "netns", "del", f"den{n}-{fake}"], capture_output=True)
            with contextlib.suppress(OSError):
                cgroup_dir(d, "pids", fake).rmdir()
            with contextlib.suppress(OSError):
                (d.data_dir / "pool" / "volumes" / fake).rmdir()
            for w in (ws, stopped):
                with contextlib.suppress(RpcError):
                    d.call("workspace.delete", ref=w["ref"])
        assert_gone(d, ws["id"])
        assert not (NETNS / f"den{n}-{fake}").exists()


def _in_thread(fn: Any) -> threading.Thread:
    def target() -> None:
        with contextlib.suppress(Exception):
            fn()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_kill_during_create_leaves_nothing_half_made(spare_daemon: Daemon) -> None:
    d = spare_daemon
    with make_users(d) as users:
        # Five workspaces of 1 CPU each: more than a 2-core host's default max_cpu.
        owner = users.make(max_cpu=-1)
        for i, delay in enumerate((0.03, 0.08, 0.13, 0.2, 0.3)):
            t = _in_thread(lambda i=i: d.call("workspace.create", name=f"k{i}", user=owner))
            time.sleep(delay)
            d.stop(signal.SIGKILL)
            t.join(30)
            d.start()
            rows = assert_clean(d)
            assert {w["name"] for w in rows} <= {f"k{j}" for j in range(i + 1)}
        for w in list_all(d):
            d.call("workspace.delete", ref=w["ref"])
            assert_gone(d, w["id"])
    assert instance_ids(d) == {}


@pytest.mark.slow
def test_kill_during_delete_finishes_it(spare_daemon: Daemon) -> None:
    d = spare_daemon
    with make_users(d) as users:
        # Five workspaces of 1 CPU each: more than a 2-core host's default max_cpu.
        owner = users.make(max_cpu=-1)
        keep = create(d, owner, "keep")
        for i, delay in enumerate((0.0, 0.03, 0.08, 0.15)):
            ws = create(d, owner, f"del{i}")
            detach(d, ws["ref"], "sleep 1000")
            t = _in_thread(lambda ws=ws: d.call("workspace.delete", ref=ws["ref"]))
            time.sleep(delay)
            d.stop(signal.SIGKILL)
            t.join(30)
            d.start()
            rows = assert_clean(d)
            left = [w for w in rows if w["id"] == ws["id"]]
            if left:  # killed before the delete began: still whole, and deletable
                d.call("workspace.delete", ref=ws["ref"])
            assert_gone(d, ws["id"])
            assert d.call("workspace.get", ref=keep["ref"])["state"] == "running"
        assert [w["id"] for w in assert_clean(d)] == [keep["id"]]
        d.call("workspace.delete", ref=keep["ref"])
        assert_gone(d, keep["id"])
