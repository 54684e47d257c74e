"""The daemon process: restarts, signals, kill -9, a second daemon, the log, hostile input."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from tests.conftest import DEN, Daemon, ssh_key


def rpc(daemon: Daemon, name: str, /, **params: Any) -> Any:
    c = daemon.client()
    try:
        return c.call(name, params)
    finally:
        c.close()


def snapshot(daemon: Daemon) -> dict[str, Any]:
    """Everything the daemon keeps, as root sees it (volatile fields dropped)."""
    tokens = rpc(daemon, "token.list")
    for t in tokens:
        t.pop("last_used_at")
    return {
        "users": rpc(daemon, "user.list"),
        "keys": rpc(daemon, "key.list"),
        "tokens": tokens,
        "audit": rpc(daemon, "audit.list", limit=10000),
    }


def populate(daemon: Daemon, base: Path) -> dict[str, Any]:
    _, pub = ssh_key(base, "alice")
    rpc(daemon, "user.create", name="alice", display_name="Alice", keys=[pub], max_cpu=4)
    rpc(daemon, "user.create", name="bob", role="admin")
    tok = rpc(daemon, "token.create", user="alice", right="read", expires="1d")
    gone = rpc(daemon, "token.create", user="bob", right="admin")
    rpc(daemon, "token.revoke", id=gone["id"])
    return {"token": tok["token"], "revoked": gone["token"]}


def check_tokens_work(daemon: Daemon, secrets: dict[str, Any]) -> None:
    c = daemon.client(token=secrets["token"], tcp=True)
    try:
        assert c.call("auth.whoami")["name"] == "alice"
    finally:
        c.close()
    c = daemon.client(token=secrets["revoked"], tcp=True)
    try:
        with pytest.raises(RpcError) as info:
            c.call("auth.whoami")
        assert info.value.code == -32006
    finally:
        c.close()


def test_restart_keeps_state(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    secrets = populate(d, d.base)
    before = snapshot(d)
    assert len(before["users"]) == 2 and len(before["keys"]) == 1 and len(before["tokens"]) == 2
    assert len(before["audit"]) == 5
    d.restart()
    assert snapshot(d) == before
    check_tokens_work(d, secrets)
    assert d.call_as("alice", "auth.whoami")["result"]["name"] == "alice"
    assert d.call_as("bob", "auth.whoami")["result"]["role"] == "admin"
    # And it goes on auditing after the restart.
    rpc(d, "user.update", name="alice", display_name="A.")
    assert rpc(d, "audit.list", limit=1)[0]["method"] == "user.update"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_stop(fresh_daemon: Daemon, sig: int) -> None:
    d = fresh_daemon
    state = d.data_dir / "serve.json"
    info = json.loads(state.read_text())
    assert d.proc is not None and info["pid"] == d.proc.pid
    assert info["socket"] == str(d.socket)
    assert d.stop(sig) == 0
    assert not d.socket.exists()
    assert not state.exists()
    assert "stopped" in d.log_text()
    d.start()
    assert d.call("rpc.health")["status"] == "ok"


def test_kill_9_then_start(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    secrets = populate(d, d.base)
    before = snapshot(d)
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert d.socket.exists()  # stale: nobody listens on it
    d.start()
    assert d.call("rpc.health")["status"] == "ok"
    assert snapshot(d) == before
    check_tokens_work(d, secrets)
    st = os.stat(d.socket)
    assert st.st_mode & 0o777 == 0o660


def test_second_daemon_refused(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    res = subprocess.run([DEN, "serve"], env=d.env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "another daemon is listening" in res.stderr
    assert str(d.socket) in res.stderr
    assert "Traceback" not in res.stderr
    # The first one is unharmed: its socket and state file are still there.
    assert d.socket.exists() and (d.data_dir / "serve.json").exists()
    assert d.call("rpc.health")["status"] == "ok"
    assert d.proc is not None and d.proc.poll() is None


def test_log_has_context_and_no_secrets(fresh_daemon: Daemon, tmp_path: Path) -> None:
    d = fresh_daemon
    priv, pub = ssh_key(tmp_path, "logged")
    rpc(d, "user.create", name="carol", keys=[pub])
    tokens = [rpc(d, "token.create", user="carol", right=r)["token"] for r in ("read", "write")]
    for tok in tokens:
        c = d.client(token=tok, tcp=True)
        try:
            c.call("user.list")
            c.call("auth.whoami")
        finally:
            c.close()
    revoked = rpc(d, "token.create", user="carol")
    rpc(d, "token.revoke", id=revoked["id"])
    c = d.client(token=revoked["token"], tcp=True)
    try:
        with pytest.raises(RpcError):
            c.call("user.list")
    finally:
        c.close()
    # Secrets in wrong places: a private key as a key, a token as a display name.
    with pytest.raises(RpcError):
        rpc(d, "key.add", user="carol", key=priv.read_text())
    rpc(d, "user.update", name="carol", display_name=tokens[0])
    d.call_as("carol", "user.list")
    d.stop()  # flush everything
    log = d.log_text()
    lines = [ln for ln in log.splitlines() if " call " in ln or ln.endswith(": call")]
    assert any("method=user.create" in ln and "user=root" in ln for ln in lines), log[-2000:]
    assert any("method=user.list" in ln and "user=carol" in ln and "via=tcp" in ln for ln in lines)
    assert any("method=user.list" in ln and "user=carol" in ln and "via=unix" in ln for ln in lines)
    assert all("ms=" in ln for ln in lines)
    for tok in [*tokens, revoked["token"]]:
        secret = tok.split("_", 2)[2]
        assert secret not in log
        assert secret[:16] not in log
    body = "".join(priv.read_text().strip().splitlines()[1:-1])
    assert body[100:160] not in log
    stderr = (d.base / "stderr.log").read_text()
    for tok in tokens:
        assert tok.split("_", 2)[2] not in stderr
    d.start()


def ours(d: Daemon) -> list[str]:
    return sorted(p.pw_name for p in pwd.getpwall() if p.pw_name.startswith(d.prefix))


def our_subids(d: Daemon) -> list[str]:
    lines = (
        Path("/etc/subuid").read_text().splitlines() + Path("/etc/subgid").read_text().splitlines()
    )
    return sorted(ln for ln in lines if ln.startswith(d.prefix))


HOSTILE = [
    "../x",
    "a;rm -rf /",
    "a/../../etc",
    "$(id)",
    "a`id`",
    "root",  # reserved: `ssh root+NAME@host` means root inside a workspace
    "ünïcode",
    "名前",
    "a\x00b",
    "a\nb",
    "-rf",
    "x" * 10240,
    "a" * 10240,
]


def test_hostile_names_change_nothing(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    rpc(d, "user.create", name="keeper")
    before_users = rpc(d, "user.list")
    before_accounts = ours(d)
    before_subuid = our_subids(d)
    for bad in HOSTILE:
        for params in (
            {"name": bad},
            {"name": "ok", "display_name": bad * 1},
            {"name": "ok", "keys": [bad]},
        ):
            if params.get("display_name") is not None and len(bad) <= 200:
                continue  # short odd display names are legitimate
            with pytest.raises(RpcError) as info:
                rpc(d, "user.create", **params)
            assert info.value.code == -32602, (bad[:20], params.keys())
            if bad == "root" and "name" in params and len(params) == 1:
                assert "reserved" in str(info.value)  # says why, naming it
            else:
                assert bad not in str(info.value)
        if bad == "root":
            continue  # well formed, only reserved: looking it up finds no one
        for method, params in [
            ("user.get", {"name": bad}),
            ("user.update", {"name": bad, "display_name": "x"}),
            ("user.delete", {"name": bad}),
            ("key.list", {"user": bad}),
        ]:
            with pytest.raises(RpcError) as info:
                rpc(d, method, **params)
            assert info.value.code == -32602, (method, bad[:20])
    assert rpc(d, "user.list") == before_users
    # Only this daemon's own accounts: other test runs may share the host.
    assert ours(d) == before_accounts == [d.prefix + "keeper"]
    assert our_subids(d) == before_subuid
    assert not Path("/x").exists()
    # Error responses never echo a 10 kB input back.
    big = "y" * 10240
    c = d.client()
    try:
        status, body = c.post(
            json.dumps(
                {"jsonrpc": "2.0", "method": "user.create", "params": {"name": big}, "id": 1}
            ).encode()
        )
    finally:
        c.close()
    assert status == 200 and len(body) < 2000
    # A plausible name becomes den's own prefixed account, never the host's user.
    out = rpc(d, "user.create", name="daemon")
    assert out["account"] == d.prefix + "daemon" and out["uid"] != pwd.getpwnam("daemon").pw_uid
    rpc(d, "user.delete", name="daemon")
    assert pwd.getpwnam("root").pw_uid == 0
    assert d.call("rpc.health")["status"] == "ok"
