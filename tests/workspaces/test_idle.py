"""Idle management and metrics, on a daemon with short timeouts."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Daemon
from tests.test_metrics_auth import metrics_text
from tests.workspaces.conftest import BB, detach, own_daemon

IDLE_ENV = {
    "DEN_IDLE_CHECK_INTERVAL": "1",
    "DEN_IDLE_SUSPEND": "4",
    "DEN_METRICS_INTERVAL": "1",
    "DEN_DEFAULT_IMAGE": BB,
    "DEN_DEFAULT_MEMORY": "128M",
    "DEN_RECONCILE_INTERVAL": "0",
}


@pytest.fixture(scope="module")
def idle_daemon() -> Iterator[Daemon]:
    with own_daemon(IDLE_ENV) as d:
        d.call("user.create", name="idler")
        yield d


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def state(d: Daemon, ref: str) -> str:
    return str(d.call("workspace.get", ref=ref)["state"])


@pytest.fixture
def ws(idle_daemon: Daemon, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"i{abs(hash(request.node.name)) % 10**6}"
    idle_daemon.call("workspace.create", name=name, user="idler")
    ref = f"idler/{name}"
    try:
        yield ref
    finally:
        idle_daemon.call("workspace.delete", ref=ref)


def test_an_idle_workspace_is_suspended_with_a_reason(idle_daemon: Daemon, ws: str) -> None:
    d = idle_daemon
    wait_for(lambda: state(d, ws) == "suspended", 20, "the idle suspend")
    got = d.call("workspace.get", ref=ws)
    assert "idle for" in got["state_reason"]
    c = d.client()
    events = c.call("audit.list", {"target": f"workspace:{ws}", "method": "workspace.suspend"})
    c.close()
    assert events and events[0]["actor"] == "den" and events[0]["via"] == "idle"
    assert "idle for" in events[0]["params"]["reason"]
    # exec resumes it transparently, and it counts as activity
    out = d.call("workspace.exec", ref=ws, argv=["echo", "awake"])
    assert out["stdout"] == "awake\n"
    assert state(d, ws) == "running"


def test_a_cpu_busy_workspace_is_not_suspended(idle_daemon: Daemon, ws: str) -> None:
    d = idle_daemon
    detach(d, ws, "while :; do :; done")
    time.sleep(8)  # twice the idle timeout
    got = d.call("workspace.get", ref=ws)
    assert got["state"] == "running"
    assert got["last_activity_kind"] == "cpu"


def test_never_policy_keeps_it_running(idle_daemon: Daemon, ws: str) -> None:
    d = idle_daemon
    policy = d.call("workspace.idle", ref=ws, suspend="never")
    assert policy["idle_suspend"] == 0 and policy["effective_suspend"] == 0
    time.sleep(7)
    assert state(d, ws) == "running"
    bad = d.error("workspace.idle", ref=ws, suspend="soon")
    assert bad.code == -32602 and "duration" in str(bad)


def test_idle_stop_stops_a_suspended_workspace(idle_daemon: Daemon, ws: str) -> None:
    d = idle_daemon
    d.call("workspace.idle", ref=ws, stop="12s")
    wait_for(lambda: state(d, ws) == "stopped", 30, "the idle stop")
    assert "stopped automatically" in d.call("workspace.get", ref=ws)["state_reason"]


def test_user_default_policy_is_inherited(idle_daemon: Daemon) -> None:
    d = idle_daemon
    d.call("user.create", name="lazy")
    try:
        pol = d.call("user.idle", user="lazy", suspend="never")
        assert pol["effective_suspend"] == 0
        d.call("workspace.create", name="w", user="lazy")
        try:
            time.sleep(7)
            assert state(d, "lazy/w") == "running"
            assert d.call("workspace.idle", ref="lazy/w")["effective_suspend"] == 0
        finally:
            d.call("workspace.delete", ref="lazy/w")
    finally:
        d.call("user.delete", name="lazy")


def test_metrics_rows_appear_and_old_ones_are_dropped(idle_daemon: Daemon, ws: str) -> None:
    d = idle_daemon
    d.call("workspace.idle", ref=ws, suspend="never")
    ws_id = d.call("workspace.get", ref=ws)["id"]
    points = wait_for(
        lambda: (
            len(d.call("workspace.metrics", ref=ws)) >= 3 and d.call("workspace.metrics", ref=ws)
        ),
        15,
        "metric samples",
    )
    assert all(p["pids"] >= 2 for p in points)  # tini and its child
    assert all(p["memory_bytes"] >= 0 for p in points)
    # a sample older than the retention window is dropped by the next pass
    old = (datetime.now(UTC) - timedelta(days=3)).isoformat(sep=" ")
    db = sqlite3.connect(d.data_dir / "den.db")
    db.execute(
        "INSERT INTO metric_samples (workspace_id, at, cpu_seconds, memory_bytes, pids, "
        "net_rx_bytes, net_tx_bytes) VALUES (?, ?, 0, 0, 0, 0, 0)",
        (ws_id, old),
    )
    db.commit()

    def old_rows() -> int:
        return int(
            db.execute(
                "SELECT count(*) FROM metric_samples WHERE workspace_id = ? AND at < ?",
                (ws_id, (datetime.now(UTC) - timedelta(days=2)).isoformat(sep=" ")),
            ).fetchone()[0]
        )

    assert old_rows() == 1
    wait_for(lambda: old_rows() == 0, 10, "the old sample to be dropped")
    db.close()
    stepped = d.call("workspace.metrics", ref=ws, step=3)
    assert len(stepped) < len(d.call("workspace.metrics", ref=ws))


def test_prometheus_endpoint_parses_and_has_the_series(idle_daemon: Daemon, ws: str) -> None:
    d = idle_daemon
    d.call("workspace.suspend", ref=ws)
    d.call("workspace.resume", ref=ws)
    time.sleep(1.5)
    text = metrics_text(d)  # as root: /metrics is for admins
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "den_rpc_calls",
        "den_rpc_latency_seconds",
        "den_workspaces",
        "den_sessions",
        "den_workspace_transitions",
        "den_resume_seconds",
        "den_suspend_seconds",
        "den_workspace_cpu_seconds",
        "den_workspace_memory_bytes",
    ):
        assert name in families, name
    calls = {
        (s.labels["method"], s.labels["outcome"]): s.value
        for s in families["den_rpc_calls"].samples
        if s.name == "den_rpc_calls_total"
    }
    assert calls[("workspace.resume", "ok")] >= 1
    running = [s for s in families["den_workspaces"].samples if s.labels["state"] == "running"]
    assert running and running[0].value >= 1
    refs = {s.labels["workspace"] for s in families["den_workspace_memory_bytes"].samples}
    assert ws in refs


def test_stats_and_top(idle_daemon: Daemon, ws: str) -> None:
    d = idle_daemon
    st = d.call("stats")
    assert st["users"] >= 1 and st["workspaces"].get("running", 0) >= 1
    assert st["memory_total_bytes"] > st["memory_available_bytes"] > 0
    assert st["pool_total_bytes"] > 0 and st["cpus"] >= 1
    out = d.cli("top", "--once", check=True)
    assert ws in out.stdout
    usage = d.call("workspace.usage")
    assert any(u["ref"] == ws for u in usage)


# -- SSH sessions: silence is not activity, typing is ---------------------------------


def ssh_argv(d: Daemon, key: Any, login: str, *cmd: str, tty: bool = True) -> list[str]:
    from tests.ssh.conftest import ssh_opts, ssh_port

    return [
        "ssh",
        *(["-tt"] if tty else []),
        *ssh_opts(key, ssh_port(d)),
        f"{login}@127.0.0.1",
        *cmd,
    ]


@pytest.fixture
def typist(idle_daemon: Daemon, tmp_path: Any) -> Iterator[tuple[str, Any]]:
    from tests.conftest import ssh_key

    d = idle_daemon
    name = f"t{abs(hash(tmp_path.name)) % 10**5}"
    d.call("user.create", name=name)
    key, pub = ssh_key(tmp_path, name)
    d.call("key.add", user=name, key=pub)
    d.call("workspace.create", name="w", user=name)
    try:
        yield name, key
    finally:
        d.call("workspace.delete", ref=f"{name}/w")
        d.call("user.delete", name=name)


def test_an_open_but_silent_ssh_session_does_not_keep_it_awake(
    idle_daemon: Daemon, typist: tuple[str, Any]
) -> None:
    import subprocess

    d = idle_daemon
    name, key = typist
    ref = f"{name}/w"
    # No suspension while the session starts (a slow login on a loaded host must
    # not race the 4 s timeout); the default policy again once the shell runs.
    d.call("workspace.idle", ref=ref, suspend="never")
    ssh = subprocess.Popen(
        ssh_argv(d, key, "w"),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: any("shell" in s["kind"] for s in d.call("session.list")), 30, "the ssh shell"
        )
        time.sleep(1)
        d.call("workspace.idle", ref=ref, suspend="default")
        try:
            wait_for(lambda: state(d, f"{name}/w") == "suspended", 45, "the idle suspend")
        except AssertionError:
            got = d.call("workspace.get", ref=f"{name}/w")
            raise AssertionError(
                f"not suspended: {got['state']}, last activity {got['last_activity_kind']} "
                f"at {got['last_activity_at']}"
            ) from None
        assert ssh.poll() is None  # the connection stays open while the workspace sleeps
        # connecting again resumes it
        out = subprocess.run(
            ssh_argv(d, key, "w", "echo", "back", tty=False),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "back" in out.stdout
        assert state(d, f"{name}/w") == "running"
    finally:
        ssh.kill()
        ssh.wait()


def test_someone_typing_keeps_it_awake(idle_daemon: Daemon, typist: tuple[str, Any]) -> None:
    import subprocess

    d = idle_daemon
    name, key = typist
    ssh = subprocess.Popen(
        ssh_argv(d, key, "w"),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert ssh.stdin is not None
        for _ in range(16):  # twice the idle timeout and more, typing all along
            ssh.stdin.write(b"echo typing\n")
            ssh.stdin.flush()
            time.sleep(0.5)
            assert state(d, f"{name}/w") == "running"
        assert d.call("workspace.get", ref=f"{name}/w")["last_activity_kind"] == "ssh"
    finally:
        ssh.kill()
        ssh.wait()
