"""Resource limits: a fork bomb stops at the pids limit, a memory hog is OOM-killed
inside its own workspace, and the neighbour keeps answering exec meanwhile."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.workspaces.conftest import (
    Users,
    assert_gone,
    cgroup_dir,
    cgroup_pids,
    create,
    make_users,
    ok,
    own_daemon,
    sh,
    wait_for,
)


@pytest.fixture(scope="module")
def neighbour(pool_daemon: Daemon, bb_image: str) -> Iterator[dict[str, Any]]:
    """Another user's workspace that must stay responsive."""
    d = pool_daemon
    with make_users(d) as users:
        ws = create(d, users.make(), "calm", cpu=0.2, mem="64M")
        try:
            yield ws
        finally:
            d.call("workspace.delete", ref=ws["ref"])
            assert_gone(d, ws["id"])


def answers(d: Daemon, ws: dict[str, Any], within: float = 10.0) -> float:
    t0 = time.monotonic()
    assert ok(d, ws["ref"], "echo alive", timeout=within) == "alive\n"
    return time.monotonic() - t0


def pids_current(d: Daemon, ws_id: str) -> int:
    return int((cgroup_dir(d, "pids", ws_id) / "pids.current").read_text())


@pytest.mark.slow
def test_fork_bomb_stops_at_pids_limit(
    pool_daemon: Daemon, users: Users, neighbour: dict[str, Any]
) -> None:
    d = pool_daemon
    ws = create(d, users.make(), "bomb", cpu=0.5, mem="128M", pids=64)
    ref, wid = ws["ref"], ws["id"]
    try:
        bomb = (
            "i=0; while [ $i -lt 200 ]; do sleep 600 >/dev/null 2>&1 & i=$((i+1)); done; echo all"
        )
        res = sh(d, ref, bomb, timeout=30)
        assert "all" not in res["stdout"], res  # the shell could not start 200 processes
        assert "fork" in res["stderr"], res
        assert pids_current(d, wid) <= 64
        assert 50 <= len(cgroup_pids(d, wid)) <= 64
        events = (cgroup_dir(d, "pids", wid) / "pids.events").read_text()
        assert int(events.split()[1]) > 0, events  # the limit refused forks
        assert answers(d, neighbour) < 10

        # A real recursive bomb, for a few seconds.
        # At the limit not even a shell forks inside: end the sleeps from the host.
        assert sh(d, ref, "echo $(echo nested)")["exit_code"] != 0
        for pid in cgroup_pids(d, wid):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x00600\x00":
                    os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: len(cgroup_pids(d, wid)) <= 4)
        sh(d, ref, "setsid sh -c 'b() { b | b & }; b' </dev/null >/dev/null 2>&1 &")
        time.sleep(3)
        assert pids_current(d, wid) <= 64
        assert answers(d, neighbour) < 10
        # Stopping ends the bomb.
        assert d.call("workspace.stop", ref=ref)["state"] == "stopped"
        assert cgroup_pids(d, wid) == []
    finally:
        d.call("workspace.delete", ref=ref)
    assert_gone(d, wid)


@pytest.mark.slow
def test_memory_hog_is_oom_killed_inside(
    pool_daemon: Daemon, users: Users, neighbour: dict[str, Any]
) -> None:
    d = pool_daemon
    ws = create(d, users.make(), "hog", cpu=0.5, mem="64M")
    ref, wid = ws["ref"], ws["id"]
    try:
        oom_control = cgroup_dir(d, "memory", wid) / "memory.oom_control"
        res = sh(d, ref, "dd if=/dev/zero of=/dev/null bs=300M count=1; echo rc=$?", timeout=60)
        assert "rc=137" in res["stdout"], res
        kills = dict(line.split() for line in oom_control.read_text().splitlines())
        assert int(kills["oom_kill"]) >= 1, kills
        res = sh(d, ref, "head -c 300m /dev/zero | tail > /dev/null", timeout=60)
        assert res["exit_code"] == 137, res
        peak = int((cgroup_dir(d, "memory", wid) / "memory.max_usage_in_bytes").read_text())
        assert peak <= 64 << 20
        # The workspace itself survives its hog, and so does the neighbour.
        assert ok(d, ref, "echo still here") == "still here\n"
        assert d.call("workspace.get", ref=ref)["state"] == "running"
        assert answers(d, neighbour) < 10
    finally:
        d.call("workspace.delete", ref=ref)
    assert_gone(d, wid)


def test_a_workspace_full_to_its_disk_limit_is_still_deleted() -> None:
    """A subvolume at its disk limit cannot delete a subvolume nested in it (EDQUOT):
    den lifts the limit and deletes it anyway, leaving nothing behind."""
    with own_daemon({"DEN_DISK_QUOTA": "true"}) as d, make_users(d) as users:
        ws = create(d, users.make(), "full", disk="64M")
        rootfs = d.data_dir / "pool" / "volumes" / ws["id"] / "rootfs"
        # What the workspace can do itself with the subvolume ioctl: a nested subvolume.
        subprocess.run(["btrfs", "subvolume", "create", str(rootfs / "nested")], check=True)
        res = d.call(
            "workspace.exec",
            ref=ws["ref"],
            argv=["sh", "-c", "dd if=/dev/urandom of=/fill bs=1M count=200; sync; true"],
            timeout=120,
        )
        assert "Disk quota exceeded" in res["stderr"] or "No space" in res["stderr"], res
        d.call("workspace.delete", ref=ws["ref"])
        assert not (d.data_dir / "pool" / "volumes" / ws["id"]).exists()
        assert_gone(d, ws["id"])
