"""Groups and the node ACL: the matrix of callers over real net.* and vol.* methods.

A write or admin method is called with parameters that fail validation: the ACL is
checked before them, so -32602 means "let through", -32003/-32006 "refused", and the
host's network and disks are never touched.
"""

from __future__ import annotations

import asyncio
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client

from den.cli.client import Client, RpcError
from tests.conftest import Daemon, running_daemon

FORBIDDEN, UNAUTHENTICATED, INVALID, CONFLICT = -32003, -32006, -32602, -32002
READS = ("net.interfaces", "vol.list_mounts")
# Let through (the ACL passed), the call stops at its parameters, changing nothing.
BAD = {
    "net.bridge.add": {"name": "x/" * 20},
    "net.conntrack.flush": {"bogus": 1},
    "vol.mount": {"bogus": 1},
}


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    acl_file = tmp_path_factory.mktemp("acl") / "acl.toml"  # absent at start: den runs
    with running_daemon(env={"DEN_ACL_FILE": str(acl_file)}) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def people(d: Daemon) -> Iterator[dict[str, Any]]:
    """An admin (admin token) and three members (write tokens; ada a read one too)."""
    tag = secrets.token_hex(2)
    names = {"adm": f"a{tag}adm", "ada": f"a{tag}ada", "bob": f"a{tag}bob", "cy": f"a{tag}cy"}
    out: dict[str, Any] = {"names": names}
    for key, n in names.items():
        d.call("user.create", name=n, role="admin" if key == "adm" else "member")
        right = "admin" if key == "adm" else "write"
        out[key] = d.call("token.create", user=n, right=right)["token"]
    out["ada_read"] = d.call("token.create", user=names["ada"], right="read")["token"]
    try:
        yield out
    finally:
        for n in names.values():
            d.client().call("user.delete", {"name": n})


@pytest.fixture(scope="module")
def outsider() -> Iterator[pwd.struct_passwd]:
    """A host account that is not a den user: anonymous on the unix socket."""
    account = f"dtacl{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", account],
                   check=True, capture_output=True)  # fmt: skip
    try:
        yield pwd.getpwnam(account)
    finally:
        subprocess.run(["userdel", account], capture_output=True, check=False)


def call(d: Daemon, token: str | None, method: str, params: dict[str, Any] | None = None) -> Any:
    """One call over TCP with the token (None: anonymous remote); the error code or 'ok'."""
    c = Client(url=d.http_url, token=token, timeout=60)
    try:
        c.call(method, params or {})
        return "ok"
    except RpcError as err:
        return err.code
    finally:
        c.close()


def check(d: Daemon, method: str, **params: Any) -> Any:
    """acl.check as root (its 'method' parameter is Daemon.call's own)."""
    c = d.client()
    try:
        return c.call("acl.check", {"method": method, **params})
    finally:
        c.close()


def outcome(d: Daemon, token: str | None, method: str) -> Any:
    """'ok' for a read, 'pass' when a write/admin call got past the ACL, else the code."""
    if method in READS:
        return call(d, token, method)
    code = call(d, token, method, BAD[method])
    return "pass" if code == INVALID else code


def local(d: Daemon, who: pwd.struct_passwd | str, method: str) -> Any:
    """The same over the unix socket: as a den user's account, or as a stranger."""
    params = BAD.get(method, {})
    if isinstance(who, str):
        resp = d.call_as(who, method, params)
    else:
        resp = d.call_as_uid(who.pw_uid, who.pw_gid, method, params)
    if "result" in resp:
        return "ok"
    code = resp["error"]["code"]
    return "pass" if code == INVALID and method in BAD else code


@pytest.fixture
def clean(d: Daemon) -> Iterator[None]:
    """Each test starts and ends with no group and no entry made through the API."""
    yield
    for e in d.call("acl.list"):
        if e["source"] == "api":
            d.call("acl.revoke", principal=e["principal"], pattern=e["pattern"])
    for g in d.call("group.list"):
        if g["source"] == "api":
            d.call("group.delete", name=g["name"])


def test_without_grants_only_admins_reach_node_methods(
    d: Daemon, people: dict[str, Any], outsider: pwd.struct_passwd, clean: None
) -> None:
    for m in (*READS, *BAD):
        assert outcome(d, people["adm"], m) in ("ok", "pass"), m
        assert check(d, m, user=people["names"]["adm"])["allowed"]
        for member in ("ada", "bob", "cy"):
            assert outcome(d, people[member], m) == FORBIDDEN, (member, m)
        assert outcome(d, None, m) == UNAUTHENTICATED, m
        assert local(d, outsider, m) == UNAUTHENTICATED, m
        assert local(d, people["names"]["ada"], m) == FORBIDDEN, m
    # The den role still works as before for the rest of the API.
    assert call(d, people["ada"], "workspace.list") == "ok"
    err = Client(url=d.http_url, token=people["ada"]).call
    with pytest.raises(RpcError) as info:
        err("net.bridge.add", BAD["net.bridge.add"])
    assert "den acl grant" in info.value.message and "net.bridge.add" in info.value.message


def test_anonymous_policy_entries(
    d: Daemon, people: dict[str, Any], outsider: pwd.struct_passwd, clean: None
) -> None:
    d.call("acl.grant", principal="anonymous-local", pattern="*", right="read")
    for m in READS:
        assert local(d, outsider, m) == "ok"
        assert outcome(d, None, m) == UNAUTHENTICATED  # remote callers: still nothing
        # Being known never gives less than being anonymous at the same place.
        assert local(d, people["names"]["bob"], m) == "ok"
        assert outcome(d, people["bob"], m) == FORBIDDEN  # over TCP: the remote policy
    assert local(d, outsider, "net.bridge.add") == UNAUTHENTICATED
    d.call("acl.grant", principal="anonymous-remote", pattern="vol.*", right="read")
    assert outcome(d, None, "vol.list_mounts") == "ok"
    assert outcome(d, None, "net.interfaces") == UNAUTHENTICATED
    d.call("acl.revoke", principal="anonymous-local", pattern="*")
    assert local(d, outsider, "net.interfaces") == UNAUTHENTICATED


def test_nested_groups_and_rights(d: Daemon, people: dict[str, Any], clean: None) -> None:
    n = people["names"]
    d.call("group.create", name="netops", description="network operators")
    d.call("group.create", name="oncall")
    d.call("group.add_member", group="oncall", user=n["ada"])
    d.call("group.add_member", group="netops", member_group="oncall")
    d.call("acl.grant", principal="group:netops", pattern="net.*", right="read")
    d.call("acl.grant", principal=f"user:{n['cy']}", pattern="vol.mount", right="write")
    # ada is in netops through oncall: she reads net.*, and nothing else.
    assert outcome(d, people["ada"], "net.interfaces") == "ok"
    assert outcome(d, people["ada"], "vol.list_mounts") == FORBIDDEN
    # Her write token does not make bridges: the grant says read.
    assert outcome(d, people["ada"], "net.bridge.add") == FORBIDDEN
    d.call("acl.grant", principal="group:netops", pattern="net.bridge.*", right="write")
    assert outcome(d, people["ada"], "net.bridge.add") == "pass"
    assert outcome(d, people["ada_read"], "net.bridge.add") == FORBIDDEN  # a read token
    # An admin method needs an admin grant, write is not enough.
    assert outcome(d, people["ada"], "net.conntrack.flush") == FORBIDDEN
    d.call("acl.grant", principal="group:oncall", pattern="net.conntrack.flush", right="admin")
    assert outcome(d, people["ada"], "net.conntrack.flush") == "pass"
    # A direct user grant on one method; bob, in no group, has nothing.
    assert outcome(d, people["cy"], "vol.mount") == "pass"
    assert outcome(d, people["cy"], "vol.list_mounts") == FORBIDDEN
    for m in (*READS, *BAD):
        assert outcome(d, people["bob"], m) == FORBIDDEN
    why = check(d, "net.bridge.add", user=n["ada"])
    assert why["allowed"] and why["granted"] == "write"
    assert why["reasons"][0]["through"] == ["oncall", "netops"]
    assert "oncall < netops" in why["explanation"]
    no = check(d, "vol.inventory", user=n["bob"])
    assert not no["allowed"] and no["granted"] == "none"
    g = d.call("group.get", name="netops")
    assert g["groups"] == ["oncall"] and g["all_users"] == [n["ada"]]
    assert {(x["pattern"], x["right"]) for x in g["grants"]} == {
        ("net.*", "read"),
        ("net.bridge.*", "write"),
    }
    # A member sees only their own groups and the entries that apply to them.
    ada = Client(url=d.http_url, token=people["ada"])
    assert {x["name"] for x in ada.call("group.list", {})} == {"netops", "oncall"}
    assert all(x["principal"] in ("group:netops", "group:oncall") for x in ada.call("acl.list", {}))
    bob = Client(url=d.http_url, token=people["bob"])
    assert bob.call("group.list", {}) == []
    with pytest.raises(RpcError) as info:
        bob.call("acl.check", {"method": "net.status", "user": n["ada"]})
    assert info.value.code == FORBIDDEN
    with pytest.raises(RpcError) as info:
        bob.call("group.create", {"name": "mine"})
    assert info.value.code == FORBIDDEN


def test_revocation_applies_to_open_connections(
    d: Daemon, people: dict[str, Any], clean: None
) -> None:
    n = people["names"]
    d.call("group.create", name="ops")
    d.call("group.create", name="inner")
    d.call("group.add_member", group="ops", member_group="inner")
    d.call("group.add_member", group="inner", user=n["ada"])
    d.call("acl.grant", principal="group:ops", pattern="net.*", right="read")
    ada = Client(url=d.http_url, token=people["ada"])  # one connection, kept open
    try:
        ada.call("net.interfaces", {})
        conn = ada._conn
        d.call("group.remove_member", group="ops", member_group="inner")
        with pytest.raises(RpcError) as info:
            ada.call("net.interfaces", {})
        assert info.value.code == FORBIDDEN
        d.call("group.add_member", group="ops", member_group="inner")
        ada.call("net.interfaces", {})
        d.call("acl.revoke", principal="group:ops", pattern="net.*")
        with pytest.raises(RpcError) as info:
            ada.call("net.interfaces", {})
        assert info.value.code == FORBIDDEN
        d.call("acl.grant", principal="group:ops", pattern="net.*", right="read")
        ada.call("net.interfaces", {})
        d.call("group.delete", name="inner")  # deleting a group drops its memberships
        with pytest.raises(RpcError) as info:
            ada.call("net.interfaces", {})
        assert info.value.code == FORBIDDEN
        assert ada._conn is conn  # the same connection throughout
    finally:
        ada.close()


def test_group_loops_refused(d: Daemon, clean: None) -> None:
    for g in ("la", "lb", "lc"):
        d.call("group.create", name=g)
    d.call("group.add_member", group="la", member_group="lb")
    d.call("group.add_member", group="lb", member_group="lc")
    for group, member in (("lc", "la"), ("lb", "la"), ("la", "la")):
        err = d.error("group.add_member", group=group, member_group=member)
        assert err.code == CONFLICT and "loop" in err.message
    assert d.call("group.get", name="lc")["groups"] == []


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("group.create", {"name": "../etc"}, "name"),
        ("group.create", {"name": "a" * 200}, "name"),
        ("group.create", {"name": "Ops"}, "name"),
        ("group.create", {"name": "ops;rm -rf"}, "name"),
        ("group.create", {"name": ""}, "name"),
        ("group.create", {"name": "ok", "description": "a\nb"}, "description"),
        ("group.add_member", {"group": "x", "user": "../root"}, "user"),
        ("acl.grant", {"principal": "group:../x", "pattern": "net.*", "right": "read"}, "principal"),
        ("acl.grant", {"principal": "root", "pattern": "net.*", "right": "read"}, "principal"),
        ("acl.grant", {"principal": "anonymous-local", "pattern": "../*", "right": "read"}, "pattern"),
        ("acl.grant", {"principal": "anonymous-local", "pattern": "user.*", "right": "read"}, "pattern"),
        ("acl.grant", {"principal": "anonymous-local", "pattern": "net.*;x", "right": "read"}, "pattern"),
        ("acl.grant", {"principal": "anonymous-local", "pattern": "net.nosuch", "right": "read"}, "pattern"),
        ("acl.grant", {"principal": "anonymous-local", "pattern": "net.*", "right": "root"}, "right"),
        ("acl.check", {"method": "x" * 300}, "method"),
    ],
)  # fmt: skip
def test_hostile_names(d: Daemon, method: str, params: dict[str, Any], field: str) -> None:
    with pytest.raises(RpcError) as info:
        d.client().call(method, params)
    err = info.value
    assert err.code == INVALID
    assert field in {e["field"] for e in err.data["errors"]}
    assert [g for g in d.call("group.list") if g["source"] == "api"] == []
    assert [e for e in d.call("acl.list") if e["source"] == "api"] == []


def test_discover_shows_rights_and_acl_patterns(d: Daemon) -> None:
    doc = {m["name"]: m for m in d.call("rpc.discover")["methods"]}
    add = doc["net.bridge.add"]
    assert add["x-right"] == "write"
    assert add["x-acl"] == {
        "applies": True,
        "right": "write",
        "patterns": ["*", "net.*", "net.bridge.*", "net.bridge.add"],
    }
    assert "Node ACL applies" in add["description"]
    assert doc["vol.create_md_array"]["x-acl"]["right"] == "admin"
    assert doc["vol.list_mounts"]["x-acl"]["patterns"] == ["*", "vol.*", "vol.list_mounts"]
    assert doc["group.list"]["x-acl"] == {"applies": False}
    assert doc["acl.grant"]["x-right"] == "admin"


GOOD_FILE = """
[policy]
anonymous_local = "read"

[[group]]
name = "fops"
users = ["{ada}", "ghost"]

[[group]]
name = "fnet"
member_groups = ["fops"]

[[ace]]
right = "write"
groups = ["fnet"]
methods = ["net.bridge.*"]

[[ace]]
right = "read"
users = ["{bob}"]
methods = ["vol.*"]
"""


def test_acl_file(
    d: Daemon, people: dict[str, Any], outsider: pwd.struct_passwd, clean: None
) -> None:
    n = people["names"]
    path = Path(d.env["DEN_ACL_FILE"])
    path.write_text(GOOD_FILE.format(**n))
    try:
        out = d.call("acl.reload")
        assert out["present"] and out["groups"] == 2
        assert any("ghost" in w for w in out["warnings"])  # no such user: skipped, said
        assert outcome(d, people["ada"], "net.bridge.add") == "pass"
        assert outcome(d, people["bob"], "vol.list_mounts") == "ok"
        assert local(d, outsider, "net.interfaces") == "ok"
        # What the file declares is read-only through the API.
        assert d.error("group.delete", name="fops").code == FORBIDDEN
        assert d.error("group.add_member", group="fops", user=n["cy"]).code == FORBIDDEN
        err = d.error("acl.revoke", principal="group:fnet", pattern="net.bridge.*")
        assert err.code == FORBIDDEN and "acl reload" in err.message
        # ... but API groups and entries may name file groups, and survive a reload.
        d.call("group.create", name="apigrp")
        d.call("group.add_member", group="apigrp", member_group="fops")
        d.call("acl.grant", principal="group:fops", pattern="vol.list_mounts", right="read")
        assert outcome(d, people["ada"], "vol.list_mounts") == "ok"
        d.call("acl.reload")
        assert outcome(d, people["ada"], "vol.list_mounts") == "ok"
        assert d.call("group.get", name="apigrp")["groups"] == ["fops"]

        # Bad files: a clear error naming the line and field, and nothing changes.
        before = d.call("acl.list")
        bad = {
            "[[group]]\nname = 'x'\n[[group]]\nname = 'y'\nmember_group = ['x']\n": (
                "line 3",
                "member_group: unknown field",
            ),
            "[[ace]]\nright = 'root'\ngroups = ['fops']\n": ("line 1", "right"),
            "[policy]\nanonymous_local = 'all'\n": ("policy.anonymous_local",),
            '[[group]]\nname = "x\n': ("line 2", "not valid TOML"),
            "[[group]]\nname = '../etc'\n": ("line 1", "name"),
            "[[group]]\nname='p'\nmember_groups=['q']\n[[group]]\nname='q'\n"
            "member_groups=['p']\n": ("loop",),
            "[[ace]]\nright = 'read'\n": ("line 1", "names no one"),
            "[[group]]\nname = 'apigrp'\n": ("apigrp", "made through the API"),
        }
        for text, parts in bad.items():
            path.write_text(text)
            err = d.error("acl.reload")
            assert err.code == INVALID, text
            message = err.data["errors"][0]["message"]
            assert str(path) in message, message
            for part in parts:
                assert part in message, (part, message)
            assert d.call("acl.list") == before
        assert outcome(d, people["ada"], "net.bridge.add") == "pass"
    finally:
        path.unlink(missing_ok=True)
        d.call("acl.reload")  # the file gone: what it declared is gone
    assert outcome(d, people["ada"], "net.bridge.add") == FORBIDDEN
    assert [g["name"] for g in d.call("group.list") if g["source"] == "file"] == []


def mcp_tools(d: Daemon, token: str) -> set[str]:
    """The tools den's MCP server lists to the token (the official SDK's client)."""

    async def go() -> set[str]:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60)
        async with McpClient(streamable_http_client(d.http_url + "/mcp", http_client=http)) as c:
            return {t.name for t in (await c.list_tools()).tools}

    return asyncio.run(asyncio.wait_for(go(), 120))


def test_mcp_lists_node_tools_the_acl_grants(
    d: Daemon, people: dict[str, Any], clean: None
) -> None:
    n = people["names"]
    node = ("net.", "vol.", "group.", "acl.")
    bob = mcp_tools(d, people["bob"])  # a member with a write token and no grant
    assert "workspace.list" in bob and not [t for t in bob if t.startswith(("net.", "vol."))]
    d.call("acl.grant", principal=f"user:{n['bob']}", pattern="net.*", right="read")
    bob = mcp_tools(d, people["bob"])
    assert {"net.interfaces", "net.routes"} <= bob
    assert "net.bridge.add" not in bob and not [t for t in bob if t.startswith("vol.")]
    admin = mcp_tools(d, people["adm"])
    assert {"net.bridge.add", "vol.create_md_array", "net.conntrack.flush"} <= admin
    assert len([t for t in admin if t.startswith(node)]) > len(
        [t for t in bob if t.startswith(node)]
    )


def test_bad_file_stops_den_at_start(tmp_path: Path) -> None:
    acl_file = tmp_path / "acl.toml"
    acl_file.write_text("[[group]]\nname = 'ok'\n\n[[group]]\nname = 'ok'\n")
    with pytest.raises(RuntimeError) as info, running_daemon(env={"DEN_ACL_FILE": str(acl_file)}):
        pass
    assert "line 4" in str(info.value) and "declared twice" in str(info.value)
