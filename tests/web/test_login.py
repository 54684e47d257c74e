"""Browser login: one-time links made with an SSH identity, browser sessions listed and revoked.

The links and sessions are made and listed through the real daemon (RPC, CLI, the
den shell over ssh); the gate's side (using a link, reading a cookie) runs
den's own functions on the same database, as the gate in the daemon does.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest

from den.app import App
from den.config import Settings
from den.errors import Unauthenticated
from den.services.weblogin import COOKIE, SessionUser, consume_link, session_user
from tests.conftest import Daemon, running_daemon, ssh_key
from tests.ssh.conftest import Person, ssh_port

T = TypeVar("T")


def gate_run(d: Daemon, fn: Callable[[App], Awaitable[T]]) -> T:
    """Run ``fn`` with an App on the daemon's database (what the gate holds)."""
    options = {k[4:].lower(): v for k, v in d.env.items() if k.startswith("DEN_")}
    settings = Settings.model_validate(
        {k: v for k, v in options.items() if k in Settings.model_fields}
    )

    async def run() -> T:
        app = App(settings)
        try:
            return await fn(app)
        finally:
            await app.close()

    return asyncio.run(run())


def consume(d: Daemon, value: str, agent: str = "test-agent") -> tuple[str, datetime, str]:
    return gate_run(d, lambda app: consume_link(app, value, "127.0.0.1:5555", agent))


def who(d: Daemon, cookie: str) -> SessionUser | None:
    return gate_run(d, lambda app: session_user(app, cookie, "127.0.0.1"))


def link_value(url: str) -> str:
    return parse_qs(urlsplit(url).query)["t"][0]


def refused(d: Daemon, value: str, word: str) -> None:
    with pytest.raises(Unauthenticated) as info:
        consume(d, value)
    assert word in info.value.message, info.value.message


@pytest.fixture
def member(daemon: Daemon, name: str) -> Iterator[str]:
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        daemon.call("user.delete", name=name)


def link_as(d: Daemon, user: str) -> dict[str, Any]:
    resp = d.call_as(user, "login.link", {})
    assert "result" in resp, resp
    return dict(resp["result"])


def test_link_signs_in_once(daemon: Daemon, member: str) -> None:
    before = datetime.now(UTC)
    link = link_as(daemon, member)
    url = urlsplit(link["url"])
    assert (url.scheme, url.hostname, url.path) == ("https", "den.localhost", "/_den/login")
    expires = datetime.fromisoformat(link["expires_at"])
    assert before + timedelta(seconds=290) < expires < before + timedelta(seconds=310)
    value = link_value(link["url"])

    cookie, until, user = consume(daemon, value, agent="Mozilla/5.0 \x1b[31mred")
    assert user == member and COOKIE == "den_session"
    assert timedelta(days=13.9) < until - datetime.now(UTC) < timedelta(days=14.1)
    refused(daemon, value, "used already")  # single use

    me = who(daemon, cookie)
    assert me is not None and (me.name, me.role) == (member, "member")
    sid = cookie.split("_", 1)[0]
    assert me.session_id == sid
    listed = daemon.call_as(member, "login.list", {})["result"]
    assert [(s["id"], s["user"], s["state"]) for s in listed] == [(sid, member, "active")]
    assert listed[0]["client"] == "127.0.0.1:5555"
    assert listed[0]["agent"] == "Mozilla/5.0 [31mred"  # no escape sequence kept
    assert cookie.split("_", 1)[1] not in json.dumps(listed)

    # Only hashes are stored: neither the link's secret nor the cookie's is on disk.
    con = sqlite3.connect(daemon.data_dir / "den.db")
    try:
        dump = "\n".join(con.iterdump())
    finally:
        con.close()
    assert value.split("_", 1)[1] not in dump and cookie.split("_", 1)[1] not in dump
    assert value not in daemon.log_text() and cookie not in daemon.log_text()

    # The browser login is in the audit log, without the secrets.
    events = daemon.client().call("audit.list", {"actor": member, "method": "login.consume"})
    assert len(events) == 1 and events[0]["target"] == f"login-session:{sid}"
    assert value.split("_", 1)[1] not in json.dumps(events)


def test_links_race_single_use(daemon: Daemon, member: str) -> None:
    value = link_value(link_as(daemon, member)["url"])

    async def race(app: App) -> list[Any]:
        tries = [consume_link(app, value, "c", "a") for _ in range(8)]
        return list(await asyncio.gather(*tries, return_exceptions=True))

    results = gate_run(daemon, race)
    won = [r for r in results if isinstance(r, tuple)]
    assert len(won) == 1, results
    assert all(isinstance(r, Unauthenticated) for r in results if r not in won), results
    assert len(daemon.call_as(member, "login.list", {})["result"]) == 1


def test_bad_values_refused(daemon: Daemon, member: str) -> None:
    value = link_value(link_as(daemon, member)["url"])
    lid, secret = value.split("_", 1)
    refused(
        daemon, f"{lid}_{secret[:-1]}x" if secret[-1] != "x" else f"{lid}_{secret[:-1]}y", "unknown"
    )
    refused(daemon, f"{'0' * 12}_{secret}", "unknown")
    for junk in ("", "x", lid, f"{lid}_", "a" * 5000, f"{lid}_{secret}\n", f"{lid}_{secret};"):
        refused(daemon, junk, "not a den login link")
    # The link survived the wrong guesses, and a link is no session cookie.
    assert who(daemon, value) is None
    cookie = consume(daemon, value)[0]
    for junk in ("", "x_y", cookie + "x", cookie.split("_", 1)[0] + "_" + "A" * 43, value):
        assert who(daemon, junk) is None


def test_root_and_readonly_cannot_make_links(daemon: Daemon, member: str) -> None:
    err = daemon.error("login.link")
    assert err.code == -32003 and "not a den user" in str(err)
    token = daemon.call("token.create", user=member, right="read")["token"]
    c = daemon.client(token=token)
    try:
        with pytest.raises(Exception) as info:
            c.call("login.link", {})
        assert "write" in str(info.value)
    finally:
        c.close()
    # A write token is the user's identity too: it makes a link for that user only.
    token = daemon.call("token.create", user=member, right="write")["token"]
    c = daemon.client(token=token)
    try:
        value = link_value(c.call("login.link", {})["url"])
    finally:
        c.close()
    assert consume(daemon, value)[2] == member
    # A login.link with params (someone else) is refused: keys stay the identity.
    resp = daemon.call_as(member, "login.link", {"user": "root"})
    assert resp["error"]["code"] == -32602


def test_revoke_list_and_rights(daemon: Daemon, member: str, name: str) -> None:
    other = name + "o"
    daemon.call("user.create", name=other)
    try:
        mine = [consume(daemon, link_value(link_as(daemon, member)["url"]))[0] for _ in range(3)]
        theirs = consume(daemon, link_value(link_as(daemon, other)["url"]))[0]
        ids = [c.split("_", 1)[0] for c in mine]
        their_id = theirs.split("_", 1)[0]

        # Members see and revoke only their own sessions.
        listed = daemon.call_as(member, "login.list", {})["result"]
        assert sorted(s["id"] for s in listed) == sorted(ids)
        assert daemon.call_as(member, "login.list", {"user": other})["error"]["code"] == -32001
        resp = daemon.call_as(member, "login.revoke", {"id": their_id})
        assert resp["error"]["code"] == -32001
        assert who(daemon, theirs) is not None

        out = daemon.call_as(member, "login.revoke", {"id": ids[0]})["result"]
        assert [(s["id"], s["state"]) for s in out] == [(ids[0], "revoked")]
        assert who(daemon, mine[0]) is None and who(daemon, mine[1]) is not None
        resp = daemon.call_as(member, "login.revoke", {"all": True, "user": other})
        assert resp["error"]["code"] == -32001

        resp = daemon.call_as(member, "login.revoke", {})
        assert resp["error"]["code"] == -32602 and "id" in json.dumps(resp["error"])
        resp = daemon.call_as(member, "login.revoke", {"id": ids[1], "all": True})
        assert resp["error"]["code"] == -32602

        out = daemon.call_as(member, "login.revoke", {"all": True})["result"]
        assert sorted(s["id"] for s in out) == sorted(ids[1:])
        assert all(who(daemon, c) is None for c in mine)
        states = {s["id"]: s["state"] for s in daemon.call("login.list", user=member)}
        assert states == dict.fromkeys(ids, "revoked")

        # Admins see everyone's and sign anyone out.
        everyone = {s["id"] for s in daemon.call("login.list")}
        assert set(ids) | {their_id} <= everyone
        daemon.call("login.revoke", all=True, user=other)
        assert who(daemon, theirs) is None

        # A session ends with its user.
        again = consume(daemon, link_value(link_as(daemon, other)["url"]))[0]
        assert who(daemon, again) is not None
    finally:
        daemon.call("user.delete", name=other)
    assert who(daemon, again) is None


def test_role_is_read_at_each_request(daemon: Daemon, member: str) -> None:
    cookie = consume(daemon, link_value(link_as(daemon, member)["url"]))[0]
    daemon.call("user.update", name=member, role="admin")
    me = who(daemon, cookie)
    assert me is not None and me.role == "admin"


def test_cli_login_logins_logout(daemon: Daemon, member: str) -> None:
    out = daemon.cli("login", user=member, check=True).stdout
    assert "https://den.localhost:" in out and "/_den/login?t=" in out
    link = json.loads(daemon.cli("login", "--json", user=member, check=True).stdout)
    cookie = consume(daemon, link_value(link["url"]))[0]
    sid = cookie.split("_", 1)[0]
    table = daemon.cli("logins", user=member, check=True).stdout
    assert sid in table and "active" in table
    daemon.cli("logout", sid, user=member, check=True)
    assert who(daemon, cookie) is None
    assert "revoked" in daemon.cli("logins", user=member, check=True).stdout
    res = daemon.cli("login", check=False)  # root is no den user
    assert res.returncode != 0 and "not a den user" in res.stderr


def test_ssh_login_prints_link(daemon: Daemon, member: str, tmp_path: Any) -> None:
    key, pub = ssh_key(tmp_path, member)
    daemon.call("key.add", user=member, key=pub)
    p = Person(daemon, member, key, ssh_port(daemon))
    for login in ("den", "anyname"):  # any login that is not a workspace opens the den shell
        res = p.ssh(login, "login")
        assert res.returncode == 0, res.stderr
        urls = [w for w in res.stdout.split() if w.startswith("https://")]
        assert len(urls) == 1, res.stdout
        assert consume(daemon, link_value(urls[0]))[2] == member
    res = p.ssh("den", "login", "--json")
    value = link_value(json.loads(res.stdout)["url"])
    me = who(daemon, consume(daemon, value)[0])
    assert me is not None and me.name == member
    assert len(daemon.call("login.list", user=member)) == 3


def test_link_and_session_expire() -> None:
    env = {"DEN_LOGIN_LINK_SECONDS": "10", "DEN_WEB_SESSION_DAYS": "0.0001"}  # 8.6 s
    with running_daemon(env=env) as d:
        d.call("user.create", name="expiring")
        first = link_value(link_as(d, "expiring")["url"])
        late = link_value(link_as(d, "expiring")["url"])
        cookie, until, _ = consume(d, first)
        assert until - datetime.now(UTC) < timedelta(seconds=9)
        assert who(d, cookie) is not None
        time.sleep(10.5)
        refused(d, late, "expired")
        assert who(d, cookie) is None
        states = [s["state"] for s in d.call("login.list", user="expiring")]
        assert states == ["expired"]
        # Expired and used links are cleared when the next one is made.
        link_as(d, "expiring")
        con = sqlite3.connect(d.data_dir / "den.db")
        try:
            (count,) = con.execute("SELECT count(*) FROM login_links").fetchone()
        finally:
            con.close()
        assert count == 1


def test_live_links_bounded(daemon: Daemon, member: str) -> None:
    for _ in range(20):
        link_as(daemon, member)
    resp = daemon.call_as(member, "login.link", {})
    assert resp["error"]["code"] == -32002 and "unused login links" in resp["error"]["message"]
