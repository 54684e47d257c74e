"""The UI allow-list on the pool daemon: clients over TCP from 127.0.0.1 and
127.0.0.2 (a second loopback address), the unix socket, the den CLI, and the
dashboard through Caddy. The list is the shared daemon's: every test leaves it
open."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon
from tests.ssh.conftest import person
from tests.web.conftest import Web, serve_files
from tests.workspaces.conftest import Users, create, invalid

A, B = "127.0.0.1", "127.0.0.2"


@pytest.fixture
def d(pool_daemon: Daemon) -> Iterator[Daemon]:
    """The pool daemon with an open list before and after the test, whatever happens."""
    pool_daemon.call("ui.open")
    try:
        yield pool_daemon
    finally:
        pool_daemon.call("ui.open")


def request(
    d: Daemon,
    source: str,
    path: str = "/rpc",
    body: dict[str, Any] | None = None,
    token: str | None = None,
) -> tuple[int, Any]:
    """One request to the daemon's HTTP listener from a socket bound to ``source``."""
    url = urlsplit(d.http_url)
    conn = http.client.HTTPConnection(
        url.hostname or A, url.port, timeout=30, source_address=(source, 0)
    )
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        if body is None:
            conn.request("GET", path, headers=headers)
        else:
            conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, json.loads(raw)
        return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def whoami(d: Daemon, source: str, token: str | None = None) -> tuple[int, Any]:
    return request(
        d, source, body={"jsonrpc": "2.0", "id": 1, "method": "auth.whoami"}, token=token
    )


def last_audit(d: Daemon, method: str) -> dict[str, Any]:
    c = d.client()
    try:
        events: list[dict[str, Any]] = c.call("audit.list", {"method": method, "limit": 1})
    finally:
        c.close()
    assert events, method
    return events[0]


def test_the_list_blocks_an_address_and_open_lets_it_back_without_a_restart(d: Daemon) -> None:
    assert d.call("ui.list") == []
    for source in (A, B):
        status, reply = whoami(d, source)
        assert status == 200 and reply["result"]["via"] == "tcp", (source, reply)

    out = d.cli("ui", "allow", A, "--note", "the lead's desk", check=True)
    assert "Only listed addresses" in out.stderr
    status, reply = whoami(d, B)
    assert status == 403
    assert reply["error"]["code"] == -32003
    message = reply["error"]["message"]
    assert f"{B} is not on den's UI allow-list" in message and f"den ui allow {B}" in message
    # Every path of the listener, not only /rpc.
    assert request(d, B, "/openrpc.json")[0] == 403
    assert request(d, B, "/metrics")[0] == 403
    status, page = request(d, B, "/")
    assert status == 403 and "UI allow-list" in page
    # The listed address and the unix socket still work.
    assert whoami(d, A)[0] == 200
    assert d.call("auth.whoami")["via"] == "unix"

    listed = json.loads(d.cli("ui", "list", "--json", check=True).stdout)
    assert [(e["network"], e["note"], e["created_by"]) for e in listed] == [
        (A, "the lead's desk", "root")
    ]
    table = d.cli("ui", "list", check=True).stdout
    assert A in table and "the lead's desk" in table
    # Allowing it again changes nothing.
    d.cli("ui", "allow", A, check=True)
    assert len(d.call("ui.list")) == 1

    # A network entry covers its addresses; an IPv4-mapped IPv6 entry is its IPv4 address.
    d.call("ui.allow", addr="::ffff:127.0.0.2")
    assert [e["network"] for e in d.call("ui.list")] == [A, B]
    assert whoami(d, B)[0] == 200
    d.call("ui.remove", addr=B)
    assert whoami(d, B)[0] == 403
    d.call("ui.allow", addr="127.0.0.0/30")
    assert whoami(d, B)[0] == 200
    d.cli("ui", "remove", "127.0.0.0/30", check=True)
    assert whoami(d, B)[0] == 403

    opened = json.loads(d.cli("ui", "open", "--json", check=True).stdout)
    assert opened == {"removed": 1}
    assert whoami(d, B)[0] == 200
    assert d.call("ui.list") == []

    assert last_audit(d, "ui.open")["outcome"] == "ok"


def test_me_is_the_callers_own_address(d: Daemon, users: Users) -> None:
    admin = users.make("admin")
    token = d.call("token.create", user=admin, right="admin")["token"]
    call = {"jsonrpc": "2.0", "id": 1, "method": "ui.allow", "params": {"me": True}}
    status, reply = request(d, B, body=call, token=token)
    assert status == 200, reply
    assert reply["result"]["network"] == B and reply["result"]["created_by"] == admin
    assert whoami(d, B)[0] == 200
    assert whoami(d, A)[0] == 403
    event = last_audit(d, "ui.allow")
    assert event["actor"] == admin and event["target"] == f"ui:{B}"

    # The unix socket has no address: ADDR, or the CLI's --me from the ssh login.
    msg = invalid(d, "ui.allow", "me", me=True)
    assert "give ADDR" in msg
    res = d.cli("ui", "allow", "--me")
    assert res.returncode == 2 and "give ADDR" in res.stderr
    d.env["SSH_CONNECTION"] = "192.0.2.9 50000 192.0.2.1 22"
    try:
        d.cli("ui", "allow", "--me", check=True)
    finally:
        del d.env["SSH_CONNECTION"]
    assert "192.0.2.9" in [e["network"] for e in d.call("ui.list")]


def test_me_in_dens_ssh_shell_is_the_ssh_clients_address(
    d: Daemon, users: Users, tmp_path: Path
) -> None:
    admin = person(d, users, tmp_path, role="admin")
    res = admin.ssh("den", "ui", "allow", "--me", "--json", args=("-b", B))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["network"] == B
    assert whoami(d, B)[0] == 200 and whoami(d, A)[0] == 403


def test_bad_addresses_name_the_field(d: Daemon) -> None:
    assert "not an IP address" in invalid(d, "ui.allow", "addr", addr="den.example.com")
    assert "host bits" in invalid(d, "ui.allow", "addr", addr="10.1.2.3/8")
    assert "or --me" in invalid(d, "ui.allow", "addr")
    assert "not both" in invalid(d, "ui.allow", "addr", addr=A, me=True)
    invalid(d, "ui.allow", "addr", addr="1" * 65)
    invalid(d, "ui.remove", "addr", addr="::g")
    with pytest.raises(RpcError) as info:
        d.call("ui.remove", addr="192.0.2.1")
    assert info.value.code == -32001 and "not on the UI allow-list" in info.value.message
    assert d.call("ui.list") == []


def test_members_may_not_touch_the_list(d: Daemon, users: Users) -> None:
    member = users.make("member")
    for method, params in (
        ("ui.list", {}),
        ("ui.allow", {"addr": A}),
        ("ui.remove", {"addr": A}),
        ("ui.open", {}),
    ):
        res = d.call_as(member, method, params)
        assert res["error"]["code"] == -32003, (method, res)
    assert d.call("ui.list") == []


def test_the_dashboard_through_caddy_is_checked_workspace_urls_are_not(
    d: Daemon, web: Web, users: Users, web_bb: str
) -> None:
    owner = users.make("member")
    create(d, owner, "app", image=web_bb)
    ref = f"{owner}/app"
    serve_files(d, ref)
    d.call("share.set", ref=ref, mode="public")
    assert web.curl(web.home).status != 403

    # Caddy connects from 127.0.0.1: a network without it shuts den's pages to it.
    d.call("ui.allow", addr="192.0.2.0/24")
    home = web.curl(web.home)
    assert home.status == 403, home.text
    assert "not on den&#x27;s UI allow-list" in home.text or "UI allow-list" in home.text
    assert "den ui allow 127.0.0.1" in home.text
    # The TCP listener too; the sign-in page (for workspace URLs) and the apps are not.
    assert whoami(d, A)[0] == 403
    assert web.curl(web.home + "_den/login").status == 401
    app = web.curl(web.url(owner, "app"))
    assert app.status == 200 and app.text == "hello from den"

    d.call("ui.open")
    assert web.curl(web.home).status != 403
    assert whoami(d, A)[0] == 200
