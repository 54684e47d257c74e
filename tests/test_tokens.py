"""API tokens: shown once, stored hashed, expiring and revocable."""

from __future__ import annotations

import http.client
import json
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import Daemon


@pytest.fixture
def member(daemon: Daemon, name: str) -> Iterator[str]:
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        daemon.client().call("user.delete", {"name": name})


def post(daemon: Daemon, authorization: str | None, method: str = "auth.whoami") -> tuple[int, Any]:
    """POST one call over TCP with a raw Authorization header; return (status, body)."""
    conn = http.client.HTTPConnection(urlsplit(daemon.http_url).netloc, timeout=30)
    headers: dict[str, str | bytes] = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization.encode()  # raw bytes: may be non-ASCII
    try:
        conn.request(
            "POST",
            "/rpc",
            body=json.dumps({"jsonrpc": "2.0", "method": method, "id": 1}),
            headers=headers,
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def assert_refused(daemon: Daemon, token: str, word: str) -> None:
    status, body = post(daemon, f"Bearer {token}")
    assert status == 401, body
    assert body["error"]["code"] == -32006
    assert word in body["error"]["message"], body


def test_secret_shown_once(daemon: Daemon, member: str) -> None:
    created = daemon.call("token.create", user=member, right="read", description="ci bot")
    token = created["token"]
    assert token.startswith(f"den_{created['id']}_")
    assert len(token.split("_", 2)[2]) >= 40
    assert (created["user"], created["right"], created["state"]) == (member, "read", "active")
    assert created["description"] == "ci bot" and created["expires_at"] is None
    listed = daemon.call("token.list", user=member)
    assert len(listed) == 1
    assert "token" not in listed[0]
    assert token not in json.dumps(listed)
    assert token.split("_", 2)[2] not in json.dumps(daemon.call("token.list"))
    status, body = post(daemon, f"Bearer {token}")
    assert status == 200 and body["result"]["token"] == created["id"]
    assert body["result"]["name"] == member
    assert daemon.call("token.list", user=member)[0]["last_used_at"] is not None


def test_default_owner_and_right(daemon: Daemon, member: str) -> None:
    resp = daemon.call_as(member, "token.create", {})
    out = resp["result"]
    assert (out["user"], out["right"]) == (member, "write")
    # root is not a den user: it must name the owner.
    err = daemon.error("token.create")
    assert err.code == -32602 and "user" in str(err)


def test_only_hash_in_database(daemon: Daemon, member: str) -> None:
    created = daemon.call("token.create", user=member)
    token = created["token"]
    secret = token.split("_", 2)[2]
    db = daemon.data_dir / "den.db"
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT id, secret_hash FROM tokens WHERE id = ?", (created["id"],)
        ).fetchall()
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    assert len(rows) == 1
    stored = rows[0][1]
    assert stored and secret not in stored and stored != secret
    assert secret not in dump and token not in dump
    for path in daemon.data_dir.glob("den.db*"):  # the database, its WAL and shm files
        raw = path.read_bytes()
        assert secret.encode() not in raw, path
        assert secret[:20].encode() not in raw, path


def test_expiry(daemon: Daemon, member: str) -> None:
    short = daemon.call("token.create", user=member, right="read", expires="2s")
    iso_at = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    iso = daemon.call("token.create", user=member, right="read", expires=iso_at)
    naive_at = (datetime.now(UTC) + timedelta(days=1)).replace(tzinfo=None).isoformat()
    day = daemon.call("token.create", user=member, right="read", expires=naive_at)
    assert datetime.fromisoformat(iso["expires_at"]) == datetime.fromisoformat(iso_at)
    assert abs(datetime.fromisoformat(short["expires_at"]) - datetime.now(UTC)) < timedelta(
        seconds=3
    )
    for t in (short, iso, day):
        assert post(daemon, f"Bearer {t['token']}")[0] == 200
    time.sleep(2.2)
    for t in (short, iso):
        assert_refused(daemon, t["token"], "expired")
        status, body = post(daemon, f"Bearer {t['token']}", "rpc.health")
        assert status == 401, body  # even public methods: a bad credential is never ignored
    assert post(daemon, f"Bearer {day['token']}")[0] == 200
    states = {t["id"]: t["state"] for t in daemon.call("token.list", user=member)}
    assert states == {short["id"]: "expired", iso["id"]: "expired", day["id"]: "active"}


@pytest.mark.parametrize("expires", ["1h", "30d", "1h30m", "2w"])
def test_duration_forms(daemon: Daemon, member: str, expires: str) -> None:
    out = daemon.call("token.create", user=member, expires=expires)
    assert datetime.fromisoformat(out["expires_at"]) > datetime.now(UTC) + timedelta(minutes=59)


@pytest.mark.parametrize(
    "expires",
    [
        "0s",
        "2001-01-01T00:00:00+00:00",
        "yesterday",
        "-5m",
        "12 parsecs",
        "30x",
        "   ",
        "2025-13-45",
    ],
)
def test_bad_expiry(daemon: Daemon, member: str, expires: str) -> None:
    err = daemon.error("token.create", user=member, expires=expires)
    assert err.code == -32602
    assert err.data["errors"][0]["field"] == "expires"
    assert daemon.call("token.list", user=member) == []


def test_past_expiry_message(daemon: Daemon, member: str) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    err = daemon.error("token.create", user=member, expires=past)
    assert "past" in str(err)


def test_revocation_is_immediate(daemon: Daemon, member: str) -> None:
    created = daemon.call("token.create", user=member, right="write")
    c = daemon.client(token=created["token"], tcp=True)
    try:
        assert c.call("auth.whoami")["name"] == member  # keeps its connection open
        revoked = daemon.call("token.revoke", id=created["id"])
        assert revoked["state"] == "revoked" and revoked["revoked_at"] is not None
        status, body = c.post(b'{"jsonrpc": "2.0", "method": "user.list", "id": 1}')
        assert status == 401
        err = json.loads(body)["error"]
        assert err["code"] == -32006 and "revoked" in err["message"]
    finally:
        c.close()
    assert_refused(daemon, created["token"], "revoked")
    # Revoking twice is harmless and keeps the first time.
    again = daemon.call("token.revoke", id=created["id"])
    assert again["revoked_at"] == revoked["revoked_at"]
    assert daemon.error("token.revoke", id="nosuchtoken").code == -32001


def test_member_revokes_own_token(daemon: Daemon, member: str) -> None:
    created = daemon.call("token.create", user=member)
    resp = daemon.call_as(member, "token.revoke", {"id": created["id"]})
    assert resp["result"]["state"] == "revoked"
    assert_refused(daemon, created["token"], "revoked")


def test_deleting_the_user_kills_their_tokens(daemon: Daemon, name: str) -> None:
    daemon.call("user.create", name=name)
    created = daemon.call("token.create", user=name)
    assert post(daemon, f"Bearer {created['token']}")[0] == 200
    daemon.call("user.delete", name=name)
    assert_refused(daemon, created["token"], "unknown")


def test_malformed_and_unknown_tokens(daemon: Daemon, member: str) -> None:
    real = daemon.call("token.create", user=member)
    tid = real["id"]
    cases = {
        "Bearer": "Bearer",
        "Bearer ": "Bearer",
        "Basic dXNlcjpwYXNz": "Bearer",
        "Bearer garbage": "malformed",
        "Bearer den_": "malformed",
        f"Bearer den_{tid}": "malformed",
        f"Bearer den_{tid}_": "malformed",
        f"Bearer den_{tid}_{'A' * 43}": "unknown",
        f"Bearer den_nosuchid_{'A' * 43}": "unknown",
        f"Bearer {real['token']}x": "unknown",
        f"Bearer {real['token'][:-1]}": "unknown",
        "Bearer den_" + "x" * 5000 + "_y": "unknown",
        "Bearer den_💥_secret": "unknown",
    }
    for header, word in cases.items():
        status, body = post(daemon, header)
        assert status == 401, (header[:40], body)
        assert body["error"]["code"] == -32006, header[:40]
        assert word in body["error"]["message"], (header[:40], body)
        assert real["token"] not in json.dumps(body)
    # The real one still works.
    assert post(daemon, f"Bearer {real['token']}")[0] == 200


def test_unknown_token_over_client(daemon: Daemon) -> None:
    c = daemon.client(token="den_abc_" + "z" * 43, tcp=True)
    try:
        status, body = c.post(b'{"jsonrpc": "2.0", "method": "rpc.health", "id": 1}')
    finally:
        c.close()
    assert status == 401
    assert json.loads(body)["error"]["code"] == -32006


def cli_as(daemon: Daemon, user: str, *args: str) -> str:
    return daemon.cli(*args, user=user, check=True).stdout


def test_cli_token_create_ls_revoke(daemon: Daemon, member: str) -> None:
    created = json.loads(cli_as(daemon, member, "token", "create", "--right", "read", "--json"))
    assert created["token"].startswith("den_") and created["user"] == member
    out = cli_as(daemon, member, "token", "ls", "--json")
    assert created["token"] not in out and created["id"] in out
    cli_as(daemon, member, "token", "revoke", created["id"])
    assert_refused(daemon, created["token"], "revoked")
