"""Sharing a workspace's URLs (modes, named users, secret links), its ports, and the
URLs `den show` and `den ls` print: at the RPC and CLI level, against the real daemon.

What a browser sees through Caddy is the gate's tests' part; here the gate's
functions (:func:`den.services.sharing.access`, :func:`link_ok`) are called on
the daemon's own database.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

import pytest

from den.cli.client import RpcError
from den.services import sharing
from tests.conftest import Daemon
from tests.web.conftest import call_gate
from tests.workspaces.conftest import Users, create, import_bb, invalid, own_daemon

if TYPE_CHECKING:
    pass

IMAGE = "sharebb"


@pytest.fixture(scope="module")
def image(pool_daemon: Daemon) -> Iterator[str]:
    import_bb(pool_daemon, IMAGE)
    try:
        yield IMAGE
    finally:
        with contextlib.suppress(RpcError):
            pool_daemon.call("image.delete", name=IMAGE)


@pytest.fixture
def d(pool_daemon: Daemon) -> Daemon:
    return pool_daemon


@pytest.fixture
def users(pool_daemon: Daemon) -> Iterator[Users]:
    u = Users(pool_daemon)
    try:
        yield u
    finally:
        u.cleanup()


def url_of(d: Daemon, owner: str, name: str, port: int | None = None) -> str:
    """The URL as the issue's label scheme spells it, written out independently."""
    label = f"{name}--{owner}" if port is None else f"{port}--{name}--{owner}"
    port = int(d.env.get("DEN_HTTPS_PORT") or 8443 + d.instance)
    return f"https://{label}.den.localhost:{port}/"


def ok_as(d: Daemon, user: str, method: str, **params: Any) -> Any:
    res = d.call_as(user, method, params)
    assert "error" not in res, res
    return res["result"]


def err_as(d: Daemon, user: str, method: str, **params: Any) -> dict[str, Any]:
    res = d.call_as(user, method, params)
    assert "error" in res, res
    return cast(dict[str, Any], res["error"])


def code(d: Daemon, method: str, **params: Any) -> int:
    with pytest.raises(RpcError) as info:
        d.call(method, **params)
    return info.value.code


def gate(d: Daemon, fn: str, *args: str) -> Any:
    return call_gate(d, sharing, fn, *args)


def user_id(d: Daemon, name: str) -> int:
    """A user's row id (the API names users, the gate's functions take ids)."""
    con = sqlite3.connect(d.data_dir / "den.db")
    try:
        return int(con.execute("SELECT id FROM users WHERE name = ?", (name,)).fetchone()[0])
    finally:
        con.close()


def audit_and_log(d: Daemon) -> str:
    con = sqlite3.connect(d.data_dir / "den.db")
    try:
        rows = con.execute("SELECT * FROM audit_events").fetchall()
    finally:
        con.close()
    return json.dumps(rows) + d.log_text() + (d.base / "stderr.log").read_text()


# -- URLs in show and ls ----------------------------------------------------------------


def test_urls_in_show_ls_and_cli(d: Daemon, image: str, users: Users) -> None:
    owner = users.make()
    create(d, owner, "app", image=image)
    ref = f"{owner}/app"
    main = url_of(d, owner, "app")

    shown = d.call("workspace.get", ref=ref)
    assert shown["url"] == main and shown["urls"] == [main]
    assert d.call("share.show", ref=ref)["http_port"] == 8080
    listed = d.call("workspace.list", user=owner)
    assert [w["url"] for w in listed] == [main]

    d.call("web.publish", ref=ref, port=5173)
    d.call("web.publish", ref=ref, port=3000)
    # The main URL first, then the published ports' in port order.
    urls = [main, url_of(d, owner, "app", 3000), url_of(d, owner, "app", 5173)]
    assert d.call("workspace.get", ref=ref)["urls"] == urls
    assert d.call("workspace.list", user=owner)[0]["urls"] == urls

    # Plain `den ls` and `den show`, run by the owner, print them.
    ls = d.cli("ls", user=owner, check=True).stdout
    assert "url" in ls.splitlines()[0] and main in ls
    show = d.cli("show", "app", user=owner, check=True).stdout
    assert main in show and url_of(d, owner, "app", 5173) in show

    # A new name is a new URL; the ports come along.
    d.call("workspace.rename", ref=ref, new_name="web")
    after = d.call("workspace.get", ref=f"{owner}/web")
    assert after["urls"] == [
        url_of(d, owner, "web"),
        url_of(d, owner, "web", 3000),
        url_of(d, owner, "web", 5173),
    ]


def test_new_workspaces_get_web_default_port() -> None:
    with own_daemon({"DEN_WEB_DEFAULT_PORT": "3000"}) as d:
        d.call("user.create", name="alice")
        create(d, "alice", "one", image="bb")
        assert d.call("share.show", ref="alice/one")["http_port"] == 3000
        # A copy leads to the same port as its source; sharing is not copied.
        d.call("web.port", ref="alice/one", port=4000)
        d.call("share.set", ref="alice/one", mode="public")
        d.call("workspace.clone", source="alice/one", name="two")
        copy = d.call("share.show", ref="alice/two")
        assert copy["http_port"] == 4000 and copy["mode"] == "private"


# -- modes and named users ---------------------------------------------------------------


def test_modes_and_named_users(d: Daemon, image: str, users: Users) -> None:
    owner, bob, carol = users.make(), users.make(), users.make()
    create(d, owner, "app", image=image)
    ref = f"{owner}/app"

    s = ok_as(d, owner, "share.show", ref="app")
    assert (s["mode"], s["users"], s["links"]) == ("private", [], [])
    assert s["reach"] == f"{owner} (owner) and admins"

    # Naming a user shares with them (a private workspace becomes "users").
    s = ok_as(d, owner, "share.set", ref="app", add=[bob])
    assert (s["mode"], s["users"]) == ("users", [bob])
    assert bob in s["reach"] and carol not in s["reach"]
    s = ok_as(d, owner, "share.set", ref="app", add=[carol, bob])  # bob again: no change
    assert s["users"] == sorted([bob, carol])

    st = gate(d, "access", d.call("workspace.get", ref=ref)["id"])
    owner_id, bob_id, carol_id = (user_id(d, n) for n in (owner, bob, carol))
    assert st.mode == "users" and st.owner_id == owner_id
    assert st.user_ids == {bob_id, carol_id}
    assert st.allows(bob_id, False) and st.allows(owner_id, False) and not st.allows(None, False)

    s = ok_as(d, owner, "share.set", ref="app", remove=[carol])
    assert s["users"] == [bob]
    assert not gate(d, "access", st.ws_id).allows(carol_id, False)

    # Private keeps the list (for later) but lets none of them in.
    s = ok_as(d, owner, "share.set", ref="app", mode="private")
    assert (s["mode"], s["users"]) == ("private", [bob])
    assert not gate(d, "access", st.ws_id).allows(bob_id, False)
    assert gate(d, "access", st.ws_id).allows(999999, True)  # admins

    s = ok_as(d, owner, "share.set", ref="app", mode="public")
    assert s["mode"] == "public" and s["reach"] == "anyone who has the URL"
    assert gate(d, "access", st.ws_id).allows(None, False)

    # The CLI: `den share NAME` shows, options change.
    out = d.cli("share", "app", "--mode", "users", "--remove", bob, user=owner, check=True).stdout
    assert "users" in out
    shown = json.loads(d.cli("share", "app", "--json", user=owner, check=True).stdout)
    assert (shown["mode"], shown["users"]) == ("users", [])
    assert f"{owner} (owner) and admins" in d.cli("share", "app", user=owner, check=True).stdout
    assert "users" in d.cli("share-show", "app", user=owner, check=True).stdout

    # A deleted user leaves no share behind.
    ok_as(d, owner, "share.set", ref="app", add=[carol])
    d.call("user.delete", name=carol)
    users.names.remove(carol)
    assert ok_as(d, owner, "share.show", ref="app")["users"] == []
    assert gate(d, "access", st.ws_id).user_ids == frozenset()
    assert gate(d, "access", "nosuchws") is None


def test_bad_sharing_input(d: Daemon, image: str, users: Users) -> None:
    owner, bob = users.make(), users.make()
    create(d, owner, "app", image=image)
    ref = f"{owner}/app"
    assert "no den user" in invalid(d, "share.set", "add", ref=ref, add=["nosuchuser"])
    assert "owner always" in invalid(d, "share.set", "add", ref=ref, add=[owner])
    # The owner sharing with themselves: the same clear refusal.
    e = err_as(d, owner, "share.set", ref="app", add=[owner])
    assert e["code"] == -32602 and "owner always" in e["data"]["errors"][0]["message"]
    assert "not shared with" in invalid(d, "share.set", "remove", ref=ref, remove=[bob])
    assert "both" in invalid(d, "share.set", "remove", ref=ref, add=[bob], remove=[bob])
    invalid(d, "share.set", "mode", ref=ref, mode="everyone")
    invalid(d, "share.set", "add.0", ref=ref, add=["Not A Name"])
    invalid(d, "share.set", "add", ref=ref, add=[f"u{i}" for i in range(201)])
    # Nothing of it changed anything.
    s = d.call("share.show", ref=ref)
    assert (s["mode"], s["users"]) == ("private", [])


# -- secret links -------------------------------------------------------------------------


def test_secret_links_shown_once_and_revocable(d: Daemon, image: str, users: Users) -> None:
    owner = users.make()
    create(d, owner, "app", image=image)
    create(d, owner, "other", image=image)
    ws_id = d.call("workspace.get", ref=f"{owner}/app")["id"]
    other_id = d.call("workspace.get", ref=f"{owner}/other")["id"]

    res = d.cli("share-link", "app", "--note", "for the demo", user=owner, check=True)
    assert "cannot show it again" in res.stdout + res.stderr
    made = [ln for ln in res.stdout.split() if "den_share=" in ln]
    assert len(made) == 1, res.stdout
    url = made[0]
    assert url.startswith(url_of(d, owner, "app") + "?den_share=")
    value = parse_qs(urlsplit(url).query)["den_share"][0]
    lid, secret = value.split("_", 1)
    assert len(secret) >= 40

    s = ok_as(d, owner, "share.show", ref="app")
    assert s["mode"] == "private"  # a link works in every mode, and changes none
    assert [(x["id"], x["note"], x["state"], x["created_by"]) for x in s["links"]] == [
        (lid, "for the demo", "active", owner)
    ]
    assert "1 active share link" in s["reach"]
    assert secret not in json.dumps(s) and secret not in d.cli("share", "app", user=owner).stdout

    assert gate(d, "link_ok", ws_id, value) == lid
    assert gate(d, "link_ok", ws_id, f"{lid}_{secret[:-1]}x") is None
    assert gate(d, "link_ok", other_id, value) is None  # another workspace's URL
    assert gate(d, "link_ok", ws_id, secret) is None
    assert gate(d, "link_ok", ws_id, "") is None

    # Revoked: listed as such, lets no one in; a second revoke changes nothing.
    out = d.cli("share-unlink", "app", lid, user=owner, check=True).stdout
    assert "revoked" in out
    assert gate(d, "link_ok", ws_id, value) is None
    links = ok_as(d, owner, "share.show", ref="app")["links"]
    assert [(x["id"], x["state"]) for x in links] == [(lid, "revoked")]
    assert ok_as(d, owner, "share.unlink", ref="app", id=lid)["state"] == "revoked"
    assert err_as(d, owner, "share.unlink", ref="app", id="nosuch")["code"] == -32001
    # Another workspace's link id is not this one's.
    assert err_as(d, owner, "share.unlink", ref="other", id=lid)["code"] == -32001

    # The secret went nowhere: not the audit log, not den's logs.
    recorded = audit_and_log(d)
    assert "share.link" in recorded and lid in recorded
    assert secret not in recorded


def test_link_expiry(d: Daemon, image: str, users: Users) -> None:
    owner = users.make()
    create(d, owner, "app", image=image)
    ws_id = d.call("workspace.get", ref=f"{owner}/app")["id"]
    assert "past" in invalid(d, "share.link", "expires", ref=f"{owner}/app", expires="2000-01-01")
    invalid(d, "share.link", "expires", ref=f"{owner}/app", expires="soon")
    invalid(d, "share.link", "note", ref=f"{owner}/app", note="x" * 201)
    link = ok_as(d, owner, "share.link", ref="app", expires="2s")
    value = parse_qs(urlsplit(link["url"]).query)["den_share"][0]
    assert gate(d, "link_ok", ws_id, value) == link["id"]
    time.sleep(2.5)
    assert gate(d, "link_ok", ws_id, value) is None
    links = ok_as(d, owner, "share.show", ref="app")["links"]
    assert [x["state"] for x in links] == ["expired"]


# -- ports ----------------------------------------------------------------------------------


def test_ports(d: Daemon, image: str, users: Users) -> None:
    owner = users.make()
    create(d, owner, "app", image=image)
    ref = f"{owner}/app"

    out = d.cli("port", "app", "3000", user=owner, check=True).stdout
    assert "3000" in out
    assert d.call("share.show", ref=ref)["http_port"] == 3000
    assert d.call("workspace.get", ref=ref)["url"] == url_of(d, owner, "app")

    d.cli("publish", "app", "9000", user=owner, check=True)
    s = d.call("share.show", ref=ref)
    assert s["ports"] == [9000] and s["urls"][1] == url_of(d, owner, "app", 9000)

    for bad in (0, 65536, -1):
        invalid(d, "web.port", "port", ref=ref, port=bad)
        invalid(d, "web.publish", "port", ref=ref, port=bad)
    assert code(d, "web.publish", ref=ref, port=9000) == -32002  # published already
    assert code(d, "web.publish", ref=ref, port=3000) == -32002  # the main URL's
    assert code(d, "web.port", ref=ref, port=9000) == -32002  # has its own URL
    assert code(d, "web.unpublish", ref=ref, port=9001) == -32001

    res = d.cli("unpublish", "app", "9000", user=owner)
    assert res.returncode == 0, res.stderr
    s = d.call("share.show", ref=ref)
    assert s["ports"] == [] and s["urls"] == [url_of(d, owner, "app")]
    # Now free to be the main port.
    assert d.call("web.port", ref=ref, port=9000)["http_port"] == 9000


# -- rights -----------------------------------------------------------------------------------


def test_only_owner_and_admins(d: Daemon, image: str, users: Users) -> None:
    owner, other = users.make(), users.make()
    admin = users.make(role="admin")
    create(d, owner, "app", image=image)
    ref = f"{owner}/app"
    link = ok_as(d, owner, "share.link", ref="app", note="n")

    # Another member can neither see nor change anything of it.
    for method, params in (
        ("share.show", {}),
        ("share.set", {}),
        ("share.set", {"mode": "public"}),
        ("share.set", {"add": [other]}),
        ("share.link", {}),
        ("share.unlink", {"id": link["id"]}),
        ("web.port", {"port": 3000}),
        ("web.publish", {"port": 3000}),
        ("web.unpublish", {"port": 3000}),
    ):
        e = err_as(d, other, method, ref=ref, **params)
        assert e["code"] == -32001, (method, e)
        assert link["id"] not in json.dumps(e)
    s = d.call("share.show", ref=ref)
    assert (s["mode"], s["users"], s["http_port"], s["ports"]) == ("private", [], 8080, [])
    assert [x["state"] for x in s["links"]] == ["active"]
    res = d.cli("share", ref, user=other)
    assert res.returncode != 0 and link["id"] not in res.stdout

    # An admin may, on anyone's workspace; sharing with themselves is refused.
    s = ok_as(d, admin, "share.set", ref=ref, add=[other])
    assert s["users"] == [other]
    e = err_as(d, admin, "share.set", ref=ref, add=[admin])
    assert e["code"] == -32602 and "yourself" in e["data"]["errors"][0]["message"]
    assert ok_as(d, admin, "share.unlink", ref=ref, id=link["id"])["state"] == "revoked"

    # A read-only token shows, never changes.
    tok = d.call("token.create", user=owner, right="read")["token"]
    c = d.client(token=tok)
    try:
        assert c.call("share.show", {"ref": "app"})["users"] == [other]
        with pytest.raises(RpcError) as info:
            c.call("share.set", {"ref": "app", "mode": "public"})
        assert info.value.code == -32003
        with pytest.raises(RpcError) as info:
            c.call("share.link", {"ref": "app"})
        assert info.value.code == -32003
    finally:
        c.close()
    assert d.call("share.show", ref=ref)["mode"] == "users"
