"""Resources a member cannot take from the host or the other tenants.

Before: no default quotas (a member set ``--pids 4194304`` on a host whose
pid_max is 32768, and ``--mem 20000M``); each exec buffered up to 16 MiB of
stdout and 16 MiB of stderr in the daemon, with no limit on concurrent execs
(12 grew den by 410 MB); signals and timeouts went to a pid read from a pid
file that may outlive its process. Now members get default quotas, pids are
bounded by a share of pid_max, exec output is capped per call, a member runs
a bounded number of execs at once, and den signals only through pidfds of
processes it checked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from den.backends.crun import pidfd_of_child, signal_exec
from tests.conftest import Daemon
from tests.ssh.conftest import person
from tests.workspaces.conftest import Users, cgroup_dir, create, ok, sh

MiB = 1 << 20
PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())
HOST_MIB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20


def as_member(d: Daemon, user: str, method: str, **params: Any) -> dict[str, Any]:
    """The JSON-RPC response of a call from the member's own host account."""
    return d.call_as(user, method, params)


def error_of(resp: dict[str, Any]) -> dict[str, Any]:
    assert "error" in resp, resp
    err: dict[str, Any] = resp["error"]
    return err


def field_messages(err: dict[str, Any]) -> dict[str, str]:
    return {e["field"]: e["message"] for e in err.get("data", {}).get("errors", [])}


# -- pids ---------------------------------------------------------------------------


def test_fork_bomb_stops_at_the_pids_limit(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    member = users.make()
    resp = as_member(d, member, "workspace.create", name="bomb", image=bb_image, pids=64)
    ws = resp["result"]
    pids_dir = cgroup_dir(d, "pids", ws["id"])
    assert (pids_dir / "pids.max").read_text().strip() == "64"
    host_before = len(os.listdir("/proc"))
    # Forks until the kernel refuses: every sleep holds its pid for a minute.
    res = sh(
        d,
        ws["ref"],
        "n=0; while [ $n -lt 500 ]; do sleep 60 >/dev/null 2>&1 & n=$((n+1)); done 2>/dev/null; "
        "echo forked",
        timeout=60,
    )
    try:
        current = int((pids_dir / "pids.current").read_text())
        events = (pids_dir / "pids.events").read_text().split()
        refused = int(events[events.index("max") + 1])
        assert current <= 64, current
        assert refused > 0, events  # the kernel said no, more than once
        assert res["exit_code"] in (0, 2) or res["exit_code"] >= 128, res
        # The host and the daemon are fine: it forks, and den answers at once.
        assert len(os.listdir("/proc")) - host_before < 64 + 32
        assert subprocess.run(["true"], check=False).returncode == 0
        start = time.monotonic()
        d.call("rpc.health")
        assert time.monotonic() - start < 1.0
    finally:
        d.call("workspace.stop", ref=ws["ref"])


def test_member_cannot_ask_for_pids_beyond_the_hosts_share(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    member = users.make()
    bound = PID_MAX // 4
    # The real CLI, as the member's host account.
    res = d.cli("new", "many", "--image", bb_image, "--pids", "4194304", user=member)
    assert res.returncode != 0
    assert "pids" in res.stderr and str(bound) in res.stderr, res.stderr
    assert "pid_max" in res.stderr, res.stderr
    err = error_of(
        as_member(d, member, "workspace.create", name="many", image=bb_image, pids=bound + 1)
    )
    assert err["code"] == -32602
    assert str(bound) in field_messages(err)["pids"], err
    assert d.call("workspace.list", user=member) == []
    # At the bound it works; a resize past it is refused the same way.
    ws = as_member(d, member, "workspace.create", name="top", image=bb_image, pids=bound, cpu=0.1)[
        "result"
    ]
    err = error_of(as_member(d, member, "workspace.resize", ref=ws["ref"], pids=bound + 1))
    assert err["code"] == -32602 and str(bound) in field_messages(err)["pids"]
    # Past the default, a member's workspaces hold at most half of pid_max together;
    # an admin may give more.
    as_member(d, member, "workspace.create", name="top2", image=bb_image, pids=bound, cpu=0.1)
    err = error_of(
        as_member(d, member, "workspace.create", name="top3", image=bb_image, pids=2048, cpu=0.1)
    )
    assert err["code"] == -32004, err
    assert str(PID_MAX // 2) in err["message"] and "pid_max" in err["message"], err
    small = as_member(d, member, "workspace.create", name="top3", image=bb_image, cpu=0.1)
    assert small["result"]["pids"] == 1024, small
    more = d.call("workspace.create", name="top4", user=member, image=bb_image, pids=2048, cpu=0.1)
    assert more["pids"] == 2048


# -- default quotas -----------------------------------------------------------------


def test_members_get_default_quotas_admins_none(pool_daemon: Daemon, users: Users) -> None:
    d = pool_daemon
    member, admin = users.make(), users.make(role="admin")
    shown = json.loads(d.cli("user", "show", member, "--json", check=True).stdout)
    assert shown["max_workspaces"] == 10
    assert shown["max_cpu"] == 2 * (os.cpu_count() or 1)
    assert shown["max_memory_mb"] == HOST_MIB // 2
    assert {"max_workspaces", "max_cpu", "max_memory_mb"} <= set(shown["quota_defaults"])
    got = d.call("user.get", name=admin)
    assert (got["max_workspaces"], got["max_cpu"], got["max_memory_mb"]) == (None, None, None)
    assert got["quota_defaults"] == []
    # An admin's own value wins; -1 is no limit.
    d.cli("user", "set", member, "--max-cpu", "3", "--max-workspaces", "-1", check=True)
    shown = json.loads(d.cli("user", "show", member, "--json", check=True).stdout)
    assert shown["max_cpu"] == 3 and shown["max_workspaces"] is None
    assert "max_cpu" not in shown["quota_defaults"]
    assert "max_workspaces" not in shown["quota_defaults"]
    assert "max_memory_mb" in shown["quota_defaults"]
    listed = as_member(d, member, "user.list")["result"]
    assert [(u["max_cpu"], u["max_memory_mb"]) for u in listed] == [(3, HOST_MIB // 2)]


def test_member_memory_stays_within_the_default_quota(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    member = users.make()
    # 20000M on a 24 GiB host: more than half of it, less than all.
    mem = 20000 if HOST_MIB > 20000 else HOST_MIB * 3 // 4
    res = d.cli("new", "big", "--image", bb_image, "--mem", f"{mem}M", user=member)
    assert res.returncode != 0
    assert "max_memory_mb" in res.stderr and str(HOST_MIB // 2) in res.stderr, res.stderr
    assert "default" in res.stderr, res.stderr
    ws = as_member(d, member, "workspace.create", name="small", image=bb_image, cpu=0.1)["result"]
    err = error_of(as_member(d, member, "workspace.resize", ref=ws["ref"], mem=f"{mem}M"))
    assert err["code"] == -32004 and "max_memory_mb" in err["message"], err
    # An admin lifts it for this member; then the same request works.
    d.call("user.update", name=member, max_memory_mb=-1)
    resp = as_member(d, member, "workspace.resize", ref=ws["ref"], mem=f"{mem}M")
    assert resp["result"]["memory_mb"] == mem, resp


# -- exec output and concurrency --------------------------------------------------


def _rss_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


def test_exec_output_is_capped_and_says_so(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    assert d.proc is not None
    member = users.make()
    ws = create(d, member, "loud", image=bb_image, cpu=0.5)
    fifty = 50 * MiB
    script = f"yes | head -c {fifty}; yes e | head -c {fifty} >&2; echo done >&2"
    ok(d, ws["ref"], "true")  # warm: the first exec of a workspace costs more
    base = _rss_kib(d.proc.pid, "VmRSS")
    # Restart the peak (VmHWM) counting from now: what this call alone needs.
    Path(f"/proc/{d.proc.pid}/clear_refs").write_text("5")
    resp = as_member(d, member, "workspace.exec", ref=ws["ref"], argv=["sh", "-c", script])
    peak = _rss_kib(d.proc.pid, "VmHWM")
    out = resp["result"]
    assert out["exit_code"] == 0
    assert out["truncated"] is True
    assert len(out["stdout"]) == MiB and out["stdout"].startswith("y\ny\n")
    assert len(out["stderr"]) == MiB and "done" not in out["stderr"]
    grown_mib = (peak - base) / 1024
    # The cap is 1 MiB per stream: a few MiB of copies (bytes, str, JSON) at
    # most, not the 100 MiB written (nor the 32 MiB of the old buffers).
    assert grown_mib < 12, f"den grew by {grown_mib:.1f} MiB"
    # Small output is whole and not flagged.
    small = as_member(d, member, "workspace.exec", ref=ws["ref"], argv=["echo", "hi"])["result"]
    assert small["stdout"] == "hi\n" and small["truncated"] is False
    # `den exec` streams, uncapped; `den exec --json` is the capped call, flagged.
    big = ["sh", "-c", f"yes | head -c {2 * MiB}"]
    res = d.cli("exec", ws["ref"], "--", *big, user=member, timeout=60)
    assert res.returncode == 0 and len(res.stdout) == 2 * MiB and not res.stderr
    res = d.cli("exec", "--json", ws["ref"], "--", *big, user=member, timeout=60)
    capped = json.loads(res.stdout)
    assert len(capped["stdout"]) == MiB and capped["truncated"] is True


@pytest.fixture
def execs() -> Iterator[list[threading.Thread]]:
    threads: list[threading.Thread] = []
    yield threads
    for t in threads:
        t.join(60)


def test_member_runs_a_bounded_number_of_execs_at_once(
    pool_daemon: Daemon, bb_image: str, users: Users, execs: list[threading.Thread]
) -> None:
    d = pool_daemon
    alice, bob = users.make(), users.make()
    wa = create(d, alice, "conc", image=bb_image, cpu=0.5)
    wb = create(d, bob, "conc", image=bb_image, cpu=0.5)
    limit = 8  # exec_max_concurrent's default
    results: list[dict[str, Any]] = []

    def run_one(user: str, ref: str, seconds: int) -> None:
        results.append(as_member(d, user, "workspace.exec", ref=ref, argv=["sleep", str(seconds)]))

    for _ in range(limit):
        execs.append(threading.Thread(target=run_one, args=(alice, wa["ref"], 8)))
    for t in execs:
        t.start()
    # Wait until all of alice's execs run in her workspace (init's child is a sleep too).
    deadline = time.monotonic() + 30
    count = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep"
    while int(ok(d, wa["ref"], count)) - 1 < limit:
        assert time.monotonic() < deadline, "alice's execs did not all start"
        time.sleep(0.2)
    # One more from alice is refused at once, naming the limit ...
    err = error_of(as_member(d, alice, "workspace.exec", ref=wa["ref"], argv=["true"]))
    assert err["code"] == -32004, err
    assert f"{limit} execs already running for {alice}" in err["message"], err
    assert "exec_max_concurrent" in err["message"], err
    res = d.cli("exec", wa["ref"], "--", "true", user=alice)
    assert res.returncode != 0 and "busy" in res.stderr, res.stderr
    # ... while bob's exec (and an admin's in alice's workspace) runs.
    resp = as_member(d, bob, "workspace.exec", ref=wb["ref"], argv=["echo", "bob"])
    assert resp["result"]["stdout"] == "bob\n", resp
    assert ok(d, wa["ref"], "echo admin") == "admin\n"
    for t in execs:
        t.join(60)
    assert len(results) == limit
    assert all(r["result"]["exit_code"] == 0 for r in results), results
    # Once they ended, alice may run again.
    resp = as_member(d, alice, "workspace.exec", ref=wa["ref"], argv=["echo", "again"])
    assert resp["result"]["stdout"] == "again\n", resp


# -- signals through pidfds ---------------------------------------------------------


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process of ours, on the host: what a reused pid would name."""
    p = subprocess.Popen(["sleep", "600"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def _wait_for(pattern: str, where: Path, timeout: float = 20) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(where.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no {pattern} in {where}")


def _plant(pid_file: Path, pid: int) -> None:
    """Make a pid file name ``pid``, as when its process ended and the pid was reused."""
    tmp = pid_file.with_name(pid_file.name + ".tmp")
    tmp.write_text(str(pid))
    tmp.replace(pid_file)


def test_exec_timeout_never_kills_what_a_stale_pid_file_names(
    pool_daemon: Daemon, bb_image: str, users: Users, victim: subprocess.Popen[bytes]
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "stale", image=bb_image, cpu=0.5)
    bundle = d.data_dir / "bundles" / ws["id"]
    got: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: got.append(sh(d, ws["ref"], "sleep 4", timeout=1)))
    t.start()
    try:
        _plant(_wait_for("exec-*.pid", bundle), victim.pid)
    finally:
        t.join(30)
    assert got and got[0]["timed_out"] is True, got
    assert victim.poll() is None, "den killed an unrelated process"
    # The normal case still works: a timeout kills the command itself (through its
    # pidfd), not only crun five seconds later.
    start = time.monotonic()
    res = sh(d, ws["ref"], "sleep 30", timeout=1)
    assert res["timed_out"] is True and res["exit_code"] == 124
    assert time.monotonic() - start < 4
    assert ok(d, ws["ref"], "ps -o args | grep -c '^sleep 30$' || true").strip() == "0"


def test_ssh_hangup_never_signals_what_a_stale_pid_file_names(
    pool_daemon: Daemon,
    bb_image: str,
    users: Users,
    tmp_path: Path,
    victim: subprocess.Popen[bytes],
) -> None:
    d = pool_daemon
    alice = person(d, users, tmp_path)
    ws = create(d, alice.name, "hup", image=bb_image, cpu=0.5)
    bundle = d.data_dir / "bundles" / ws["id"]
    client = subprocess.Popen(
        ["ssh", *alice.opts(), f"{alice.name}.hup@127.0.0.1", "sleep 300"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # an ssh command runs through the backend's streaming exec (its pid file);
        # planted once crun has written it and gone (the pid is stale from then on)
        pid_file = _wait_for("stream-*.pid", bundle)
        deadline = time.monotonic() + 10
        while not pid_file.read_text().strip().isdigit() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        _plant(pid_file, victim.pid)
        time.sleep(0.5)  # the command runs: the hangup goes to what the file names
    finally:
        client.kill()  # the connection drops: den sends SIGHUP to the session's process
        client.wait()
    time.sleep(1.0)
    assert victim.poll() is None, "den sent SIGHUP to an unrelated process"
    # A session whose pid file is right: the hangup ends its command in the workspace.
    client = subprocess.Popen(
        ["ssh", *alice.opts(), f"{alice.name}.hup@127.0.0.1", "sleep 301"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    running = "ps -o args | grep -c '^sleep 301' || true"
    try:
        deadline = time.monotonic() + 20
        while ok(d, ws["ref"], running).strip() != "1":
            assert time.monotonic() < deadline, "the ssh command did not start"
            time.sleep(0.1)
    finally:
        client.kill()
        client.wait()
    deadline = time.monotonic() + 10
    while ok(d, ws["ref"], running).strip() != "0":
        assert time.monotonic() < deadline, "the hangup did not end the command"
        time.sleep(0.1)


def test_signal_exec_checks_the_process_is_cruns_child() -> None:
    """The check itself, on real processes: only a live child of the given parent is signalled."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,sys; c=subprocess.Popen(['sleep','600']);"
         "print(c.pid, flush=True); c.wait()"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    stranger = subprocess.Popen(["sleep", "600"])
    pid_file = Path(f"/tmp/den-test-{os.getpid()}.pid")
    parent_fd = pidfd_of_child(parent.pid)
    try:
        assert parent.stdout is not None and parent_fd is not None
        child = int(parent.stdout.readline())
        pid_file.write_text(str(stranger.pid))
        assert not signal_exec(pid_file, parent.pid, parent_fd, signal.SIGTERM)
        assert stranger.poll() is None
        pid_file.write_text(str(child))
        assert signal_exec(pid_file, parent.pid, parent_fd, signal.SIGTERM)
        assert parent.wait(10) == 0  # its child died of the signal, then it ended
        # The parent is gone: nothing is signalled, whatever the file says.
        pid_file.write_text(str(stranger.pid))
        assert not signal_exec(pid_file, parent.pid, parent_fd, signal.SIGTERM)
        assert stranger.poll() is None
    finally:
        pid_file.unlink(missing_ok=True)
        if parent_fd is not None:
            os.close(parent_fd)
        for p in (parent, stranger):
            p.kill()
            p.wait()


def test_memory_limit_bounds_swap_too(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    """Memory plus swap is held at the memory limit, so a workspace cannot swap
    past it (set where the kernel accounts swap; crun refuses it elsewhere)."""
    from den.backends import cgroups

    if not cgroups.swap_accounted():
        pytest.skip("this kernel does not account swap per cgroup")
    d = pool_daemon
    ws = create(d, users.make(), "swap", image=bb_image, mem="256M")
    if cgroups.unified():
        swap = cgroup_dir(d, "", ws["id"]) / "memory.swap.max"
        assert swap.read_text().strip() == "0"
    else:
        memsw = cgroup_dir(d, "memory", ws["id"]) / "memory.memsw.limit_in_bytes"
        assert int(memsw.read_text()) == 256 << 20
        d.call("workspace.resize", ref=ws["ref"], mem="384M")
        assert int(memsw.read_text()) == 384 << 20
