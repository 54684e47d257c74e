"""The audit log: one event per mutating call, none for reads, no secrets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon

EVENT_FIELDS = {
    "id",
    "at",
    "actor",
    "via",
    "method",
    "target",
    "params",
    "outcome",
    "error",
    "duration_ms",
}


def rpc(daemon: Daemon, name: str, /, **params: Any) -> Any:
    """Call as root; unlike Daemon.call, a param may be named ``method``."""
    c = daemon.client()
    try:
        return c.call(name, params)
    finally:
        c.close()


def audit(daemon: Daemon, **filters: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = rpc(daemon, "audit.list", **filters)
    return result


def last_id(daemon: Daemon) -> int:
    events = audit(daemon, limit=1)
    return events[0]["id"] if events else 0


def since_id(daemon: Daemon, start: int) -> list[dict[str, Any]]:
    return [e for e in audit(daemon, limit=10000) if e["id"] > start]


@pytest.fixture
def member(daemon: Daemon, name: str) -> Iterator[str]:
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        daemon.client().call("user.delete", {"name": name})


def test_every_mutation_writes_one_event(
    daemon: Daemon, name: str, keypair: tuple[Path, str]
) -> None:
    _, pub = keypair
    start = last_id(daemon)
    daemon.call("user.create", name=name, display_name="Audited")
    daemon.call("user.update", name=name, max_cpu=2)
    fp = daemon.call("key.add", user=name, key=pub)["fingerprint"]
    tok = daemon.call("token.create", user=name, right="read")
    daemon.call("token.revoke", id=tok["id"])
    daemon.call("key.remove", user=name, fingerprint=fp)
    daemon.call("user.delete", name=name)
    events = sorted(since_id(daemon, start), key=lambda e: e["id"])
    expected = [
        ("user.create", f"user:{name}"),
        ("user.update", f"user:{name}"),
        ("key.add", f"key:{fp}"),
        ("token.create", f"token:{tok['id']}"),
        ("token.revoke", f"token:{tok['id']}"),
        ("key.remove", f"key:{fp}"),
        ("user.delete", f"user:{name}"),
    ]
    mine = [e for e in events if e["target"] in {t for _, t in expected}]
    assert [(e["method"], e["target"]) for e in mine] == expected
    for e in mine:
        assert set(e) == EVENT_FIELDS
        assert (e["actor"], e["via"], e["outcome"], e["error"]) == ("root", "unix", "ok", "")
        assert isinstance(e["duration_ms"], float | int) and 0 <= e["duration_ms"] < 60000
        assert abs(datetime.fromisoformat(e["at"]) - datetime.now(UTC)) < timedelta(minutes=5)
    params = {e["method"]: e["params"] for e in mine}
    assert params["user.create"]["name"] == name
    assert params["user.create"]["display_name"] == "Audited"
    assert params["user.update"]["max_cpu"] == 2
    assert params["key.add"] == {"user": name, "key": pub}
    assert params["key.remove"] == {"user": name, "fingerprint": fp}
    assert params["token.create"]["right"] == "read"
    assert params["token.revoke"] == {"id": tok["id"]}


def test_token_secret_never_in_audit(daemon: Daemon, member: str) -> None:
    tok = daemon.call("token.create", user=member, description="for the audit test")
    secret = tok["token"].split("_", 2)[2]
    c = daemon.client(token=tok["token"], tcp=True)
    try:
        c.call("user.update", {"name": member, "display_name": "via token"})
        # A token pasted into a free-text field is masked too.
        c.call("user.update", {"name": member, "display_name": tok["token"]})
    finally:
        c.close()
    dump = json.dumps(audit(daemon, limit=10000))
    assert secret not in dump
    assert tok["token"] not in dump
    events = audit(daemon, actor=member, method="user.update")
    assert events[0]["via"] == "tcp" and events[0]["params"]["display_name"] == "den_***"


def test_private_key_never_in_audit(daemon: Daemon, member: str, keypair: tuple[Path, str]) -> None:
    """A private key sent by mistake is refused, and its text is not kept in the audit log."""
    priv, _ = keypair
    text = priv.read_text()
    body = "".join(text.strip().splitlines()[1:-1])
    with pytest.raises(RpcError):
        daemon.call("key.add", user=member, key=text)
    with pytest.raises(RpcError):
        daemon.call("user.create", name=member + "p", keys=[text])
    events = audit(daemon, method="key.add", limit=5) + audit(daemon, method="user.create", limit=5)
    refused = [e for e in events if e["outcome"] == "invalid_params"]
    assert refused
    dump = json.dumps(audit(daemon, limit=10000))
    assert body[100:160] not in dump  # past the header every OpenSSH private key shares
    assert "PRIVATE KEY" not in dump
    assert refused[0]["params"]["key" if refused[0]["method"] == "key.add" else "keys"]


def test_failed_mutation_audited_and_changes_nothing(daemon: Daemon, member: str) -> None:
    before = daemon.call("user.get", name=member)
    start = last_id(daemon)
    with pytest.raises(RpcError) as info:
        daemon.call("user.create", name=member, role="admin")
    assert info.value.code == -32002
    assert daemon.call("user.get", name=member) == before
    events = since_id(daemon, start)
    assert len(events) == 1
    e = events[0]
    assert (e["method"], e["target"], e["actor"], e["outcome"]) == (
        "user.create",
        f"user:{member}",
        "root",
        "conflict",
    )
    assert "exists" in e["error"]
    # not found, invalid params, forbidden: each with its kind.
    start = last_id(daemon)
    with pytest.raises(RpcError):
        daemon.call("user.delete", name=member + "missing")
    with pytest.raises(RpcError):
        daemon.call("user.update", name=member, max_cpu="lots")
    member_resp = daemon.call_as(member, "user.update", {"name": member, "role": "admin"})
    assert member_resp["error"]["code"] == -32003
    events = sorted(since_id(daemon, start), key=lambda e: e["id"])
    assert [(e["method"], e["outcome"]) for e in events] == [
        ("user.delete", "not_found"),
        ("user.update", "invalid_params"),
        ("user.update", "forbidden"),
    ]
    assert events[2]["actor"] == member
    assert daemon.call("user.get", name=member) == before


def test_reads_are_not_audited(daemon: Daemon, member: str) -> None:
    start = last_id(daemon)
    daemon.call("user.get", name=member)
    daemon.call("user.list")
    daemon.call("key.list")
    daemon.call("token.list")
    daemon.call("rpc.health")
    daemon.call("auth.whoami")
    audit(daemon)
    daemon.call_as(member, "user.list")
    daemon.call_as(member, "audit.list")
    with pytest.raises(RpcError):
        daemon.call("user.get", name=member + "missing")
    assert [e for e in since_id(daemon, start) if e["actor"] in ("root", member)] == []
    for m in ("user.get", "user.list", "key.list", "token.list", "audit.list", "rpc.health"):
        assert audit(daemon, method=m) == []


def test_filters(daemon: Daemon, name: str) -> None:
    a, b = name + "a", name + "b"
    t0 = datetime.now(UTC)
    daemon.call("user.create", name=a)
    daemon.call("user.create", name=b)
    try:
        daemon.call("user.update", name=a, display_name="A")
        daemon.call_as(a, "user.update", {"name": a, "display_name": "AA"})
        by_target = audit(daemon, target=f"user:{a}")
        assert [e["method"] for e in by_target] == ["user.update", "user.update", "user.create"]
        assert [e["id"] for e in by_target] == sorted((e["id"] for e in by_target), reverse=True)
        by_actor = audit(daemon, actor=a)
        assert [(e["method"], e["via"]) for e in by_actor] == [("user.update", "unix")]
        by_method = audit(daemon, method="user.create", target=f"user:{b}")
        assert len(by_method) == 1 and by_method[0]["target"] == f"user:{b}"
        assert all(e["method"] == "user.create" for e in audit(daemon, method="user.create"))
        assert len(audit(daemon, limit=1)) == 1
        assert audit(daemon, limit=2) == audit(daemon, limit=10)[:2]
        assert audit(daemon, actor="nobody-at-all") == []
        assert all(e["outcome"] == "ok" for e in audit(daemon, outcome="ok"))
        # since: a duration back from now, or an ISO time.
        recent = audit(daemon, since="1h", target=f"user:{a}")
        assert len(recent) == 3
        iso = audit(daemon, since=t0.isoformat(), target=f"user:{a}")
        assert len(iso) == 3
        future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert audit(daemon, since=future) == []
        for bad in ({"since": "soon"}, {"limit": 0}, {"limit": "ten"}, {"colour": "red"}):
            with pytest.raises(RpcError) as info:
                audit(daemon, **bad)
            assert info.value.code == -32602
    finally:
        daemon.call("user.delete", name=a)
        daemon.call("user.delete", name=b)


def test_members_see_only_their_own_events(daemon: Daemon, member: str, name: str) -> None:
    other = name + "o"
    daemon.call("user.create", name=other)
    try:
        daemon.call_as(member, "user.update", {"name": member, "display_name": "me"})
        daemon.call_as(other, "user.update", {"name": other, "display_name": "them"})
        mine = daemon.call_as(member, "audit.list", {"limit": 10000})["result"]
        assert mine and {e["actor"] for e in mine} == {member}
        # Root's creation of the member's user is not the member's event.
        assert daemon.call_as(member, "audit.list", {"target": f"user:{member}"})["result"] == [
            e for e in mine if e["target"] == f"user:{member}"
        ]
        assert daemon.call_as(member, "audit.list", {"actor": other})["result"] == []
        assert daemon.call_as(member, "audit.list", {"actor": "root"})["result"] == []
        theirs = daemon.call_as(other, "audit.list")["result"]
        assert {e["actor"] for e in theirs} == {other}
    finally:
        daemon.call("user.delete", name=other)


def test_unauthenticated_calls_not_audited(daemon: Daemon, name: str) -> None:
    start = last_id(daemon)
    c = daemon.client(tcp=True)
    try:
        with pytest.raises(RpcError):
            c.call("user.create", {"name": name})
    finally:
        c.close()
    assert since_id(daemon, start) == []


def test_oversized_params_are_truncated(daemon: Daemon, member: str) -> None:
    with pytest.raises(RpcError):
        daemon.call("user.update", name=member, display_name="x" * 10000)
    e = audit(daemon, target="", method="user.update", limit=1)[0]
    assert e["outcome"] == "invalid_params"
    assert len(json.dumps(e["params"])) < 2000


def test_cli_audit(daemon: Daemon, member: str) -> None:
    res = daemon.cli("audit", "--target", f"user:{member}", "--json", check=True)
    events = json.loads(res.stdout)
    assert [e["method"] for e in events] == ["user.create"]
