"""The same state behaviour on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon, ssh_key

pytestmark = pytest.mark.db


def rpc(daemon: Daemon, name: str, /, **params: Any) -> Any:
    c = daemon.client()
    try:
        return c.call(name, params)
    finally:
        c.close()


def test_users_keys_tokens(db_daemon: Daemon, tmp_path: Path) -> None:
    d = db_daemon
    _, pub1 = ssh_key(tmp_path, "one")
    _, pub2 = ssh_key(tmp_path, "two")
    alice = rpc(
        d, "user.create", name="alice", display_name="Alice Ä", keys=[pub1], max_memory_mb=512
    )
    assert alice["keys"] == 1 and alice["max_memory_mb"] == 512
    rpc(d, "user.create", name="bob", role="admin")
    assert [u["name"] for u in rpc(d, "user.list")] == ["alice", "bob"]
    fp2 = rpc(d, "key.add", user="bob", key=pub2)["fingerprint"]
    with pytest.raises(RpcError) as info:
        rpc(d, "key.add", user="alice", key=pub2)
    assert info.value.code == -32002
    with pytest.raises(RpcError) as info:
        rpc(d, "user.create", name="alice")
    assert info.value.code == -32002
    assert [k["user"] for k in rpc(d, "key.list")] == ["alice", "bob"]
    tok = rpc(d, "token.create", user="alice", right="read", expires="1h")
    assert datetime.fromisoformat(tok["expires_at"]) > datetime.now(UTC) + timedelta(minutes=59)
    assert rpc(d, "user.update", name="alice", max_memory_mb=-1)["max_memory_mb"] is None
    # Deleting a user takes their keys and tokens with them.
    rpc(d, "user.delete", name="alice")
    assert [u["name"] for u in rpc(d, "user.list")] == ["bob"]
    assert [k["fingerprint"] for k in rpc(d, "key.list")] == [fp2]
    assert rpc(d, "token.list") == []
    # The freed key can be given to someone else.
    rpc(d, "key.add", user="bob", key=pub1)
    rpc(d, "key.remove", user="bob", fingerprint=fp2)
    assert len(rpc(d, "key.list", user="bob")) == 1


def test_token_over_tcp(db_daemon: Daemon) -> None:
    d = db_daemon
    rpc(d, "user.create", name="carol")
    tok = rpc(d, "token.create", user="carol", right="write")
    c = d.client(token=tok["token"], tcp=True)
    try:
        who = c.call("auth.whoami")
        assert (who["name"], who["right"], who["via"]) == ("carol", "write", "tcp")
        assert c.call("user.update", {"name": "carol", "display_name": "C"})["display_name"] == "C"
        rpc(d, "token.revoke", id=tok["id"])
        with pytest.raises(RpcError) as info:
            c.call("auth.whoami")
        assert info.value.code == -32006
    finally:
        c.close()
    listed = rpc(d, "token.list", user="carol")
    assert listed[0]["state"] == "revoked" and listed[0]["last_used_at"] is not None


def test_audit_rows(db_daemon: Daemon) -> None:
    d = db_daemon
    rpc(d, "user.create", name="dave")
    rpc(d, "user.update", name="dave", display_name="Dave")
    with pytest.raises(RpcError):
        rpc(d, "user.create", name="dave")
    d.call_as("dave", "user.update", {"name": "dave", "display_name": "D"})
    events = rpc(d, "audit.list")
    assert [(e["method"], e["actor"], e["outcome"]) for e in events] == [
        ("user.update", "dave", "ok"),
        ("user.create", "root", "conflict"),
        ("user.update", "root", "ok"),
        ("user.create", "root", "ok"),
    ]
    assert events[2]["params"] == {
        "name": "dave",
        "display_name": "Dave",
        "role": None,
        "max_workspaces": None,
        "max_cpu": None,
        "max_memory_mb": None,
        "max_disk_mb": None,
        "email": None,
        "dotfiles": None,
    }
    assert all(e["target"] == "user:dave" for e in events)
    assert len(rpc(d, "audit.list", actor="dave")) == 1
    assert len(rpc(d, "audit.list", since="10m")) == 4
    assert rpc(d, "audit.list", since=(datetime.now(UTC) + timedelta(minutes=1)).isoformat()) == []
    assert [e["id"] for e in rpc(d, "audit.list", limit=2)] == [events[0]["id"], events[1]["id"]]
    assert d.call_as("dave", "audit.list")["result"] == [events[0]]


def test_restart_keeps_state(db_daemon: Daemon, tmp_path: Path) -> None:
    d = db_daemon
    _, pub = ssh_key(tmp_path, "erin")
    rpc(d, "user.create", name="erin", keys=[pub], max_cpu=3)
    tok = rpc(d, "token.create", user="erin", right="read")
    before = {m: rpc(d, m) for m in ("user.list", "key.list")}
    audit_before = rpc(d, "audit.list")
    d.restart()
    assert {m: rpc(d, m) for m in ("user.list", "key.list")} == before
    assert rpc(d, "audit.list") == audit_before
    c = d.client(token=tok["token"], tcp=True)
    try:
        assert c.call("auth.whoami")["name"] == "erin"
    finally:
        c.close()
    assert rpc(d, "token.list")[0]["id"] == tok["id"]
