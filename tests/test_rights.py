"""The rights matrix: anonymous, member and admin callers by public/read/write/admin methods."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from den.rpc.registry import REGISTRY, Right
from den.services import load_all
from tests.conftest import Daemon

load_all()
PUBLIC = sorted(m.name for m in REGISTRY.methods.values() if m.right == Right.public)
NON_PUBLIC = sorted(m.name for m in REGISTRY.methods.values() if m.right > Right.public)
ADMIN_ONLY = sorted(m.name for m in REGISTRY.methods.values() if m.right == Right.admin)

# Posts one body (a batch) to the socket from stdin; run as another uid.
_POST = r"""
import http.client, json, socket, sys
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])
c = C("localhost", timeout=30)
try:
    c.request("POST", "/rpc", body=sys.stdin.read(), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    print(json.dumps({"status": r.status, "body": json.loads(r.read() or b"null")}))
except PermissionError:
    print(json.dumps({"status": None, "error": "permission denied"}))
"""


def post_as(daemon: Daemon, uid: int, gid: int, groups: list[int], body: Any) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-c", _POST, str(daemon.socket)],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        timeout=60,
        user=uid,
        group=gid,
        extra_groups=groups,
    )
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def batch(methods: list[str], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return [
        {"jsonrpc": "2.0", "id": i, "method": m, "params": (params or {}).get(m, {})}
        for i, m in enumerate(methods)
    ]


def by_method(methods: list[str], responses: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {methods[r["id"]]: r for r in responses}


@pytest.fixture
def outsider() -> Iterator[pwd.struct_passwd]:
    """A plain host account that is not a den user."""
    account = f"dtanon{secrets.token_hex(3)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", account],
        check=True,
        capture_output=True,
    )
    try:
        yield pwd.getpwnam(account)
    finally:
        subprocess.run(["userdel", account], capture_output=True, check=False)


@pytest.fixture
def member(daemon: Daemon, name: str) -> Iterator[str]:
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        daemon.client().call("user.delete", {"name": name})


@pytest.fixture
def other(daemon: Daemon, name: str, keypair: tuple[Path, str]) -> Iterator[dict[str, Any]]:
    """Another member, with a key and a token, whom the member must not see."""
    n = name + "o"
    daemon.call("user.create", name=n, keys=[keypair[1]])
    try:
        token = daemon.call("token.create", user=n, right="read")
        fp = daemon.call("key.list", user=n)[0]["fingerprint"]
        yield {"name": n, "token_id": token["id"], "fingerprint": fp}
    finally:
        daemon.client().call("user.delete", {"name": n})


@pytest.fixture
def admin_user(daemon: Daemon, name: str) -> Iterator[str]:
    n = name + "a"
    daemon.call("user.create", name=n, role="admin")
    try:
        yield n
    finally:
        daemon.client().call("user.delete", {"name": n})


# -- the socket itself ---------------------------------------------------------


def test_socket_mode_and_group(daemon: Daemon) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_uid == 0
    assert st.st_gid == grp.getgrnam(daemon.group).gr_gid


def test_outside_the_group_cannot_connect(daemon: Daemon, outsider: pwd.struct_passwd) -> None:
    out = post_as(daemon, outsider.pw_uid, outsider.pw_gid, [], batch(["rpc.health"]))
    assert out == {"status": None, "error": "permission denied"}


# -- anonymous on the socket ---------------------------------------------------


def test_anonymous_gets_only_public_methods(daemon: Daemon, outsider: pwd.struct_passwd) -> None:
    # info and health: the compute manager's own public calls (den.services.vm)
    assert {"rpc.health", "rpc.discover", "auth.whoami", "info", "health"} == set(PUBLIC)
    methods = PUBLIC + NON_PUBLIC
    groups = [grp.getgrnam(daemon.group).gr_gid]
    out = post_as(daemon, outsider.pw_uid, outsider.pw_gid, groups, batch(methods))
    assert out["status"] == 200
    got = by_method(methods, out["body"])
    assert got["rpc.health"]["result"]["status"] == "ok"
    assert got["rpc.discover"]["result"]["openrpc"].startswith("1.3")
    assert got["info"]["result"]["name"] == "den" and got["health"]["result"]["status"] == "ok"
    assert got["auth.whoami"]["result"] == {
        "name": "anonymous",
        "role": "anonymous",
        "right": "public",
        "via": "unix",
        "token": None,
    }
    for m in NON_PUBLIC:
        assert got[m]["error"]["code"] == -32006, (m, got[m])
        assert "needs an identity" in got[m]["error"]["message"]


def test_anonymous_cannot_change_anything(
    daemon: Daemon, outsider: pwd.struct_passwd, name: str
) -> None:
    groups = [grp.getgrnam(daemon.group).gr_gid]
    resp = daemon.call_as_uid(outsider.pw_uid, outsider.pw_gid, "user.create", {"name": name})
    assert resp["error"]["code"] == -32006
    assert daemon.error("user.get", name=name).code == -32001
    # Unauthenticated attempts are not audited under anybody's name.
    assert daemon.call("audit.list", target=f"user:{name}") == []
    out = post_as(daemon, outsider.pw_uid, outsider.pw_gid, groups, batch(["user.list"]))
    assert out["body"][0]["error"]["code"] == -32006


def test_foreign_account_with_den_prefix_is_anonymous(daemon: Daemon, name: str) -> None:
    """An account named like den's but without den's marker is nobody to den."""
    account = daemon.prefix + name
    subprocess.run(["useradd", "--no-create-home", account], check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(account)
        resp = daemon.call_as_uid(pw.pw_uid, pw.pw_gid, "auth.whoami")
        assert resp["result"]["role"] == "anonymous"
        resp = daemon.call_as_uid(pw.pw_uid, pw.pw_gid, "user.list")
        assert resp["error"]["code"] == -32006
    finally:
        subprocess.run(["userdel", account], capture_output=True, check=False)


# -- members on the socket -----------------------------------------------------


def test_member_whoami(daemon: Daemon, member: str) -> None:
    resp = daemon.call_as(member, "auth.whoami")
    assert resp["result"] == {
        "name": member,
        "role": "member",
        "right": "write",
        "via": "unix",
        "token": None,
    }


@pytest.mark.parametrize("method", ADMIN_ONLY)
def test_member_refused_admin_methods(daemon: Daemon, member: str, method: str) -> None:
    resp = daemon.call_as(member, method, {"name": member})
    assert resp["error"]["code"] == -32003, resp
    assert "admin" in resp["error"]["message"]


def test_member_read_and_write_own_objects(
    daemon: Daemon, member: str, keypair: tuple[Path, str]
) -> None:
    _, pub = keypair

    def ok(method: str, params: Any = None) -> Any:
        resp = daemon.call_as(member, method, params)
        assert "result" in resp, (method, resp)
        return resp["result"]

    assert ok("user.get", {"name": member})["name"] == member
    assert ok("user.update", {"name": member, "display_name": "M"})["display_name"] == "M"
    fp = ok("key.add", {"user": member, "key": pub})["fingerprint"]
    assert [k["fingerprint"] for k in ok("key.list", {"user": member})] == [fp]
    tok = ok("token.create", {"right": "read"})
    assert tok["user"] == member
    assert [t["id"] for t in ok("token.list")] == [tok["id"]]
    assert ok("token.revoke", {"id": tok["id"]})["state"] == "revoked"
    assert ok("key.remove", {"user": member, "fingerprint": fp})["fingerprint"] == fp
    events = ok("audit.list")
    assert events and {e["actor"] for e in events} == {member}


def test_member_sees_only_themselves(daemon: Daemon, member: str, other: dict[str, Any]) -> None:
    listed = daemon.call_as(member, "user.list")["result"]
    assert [u["name"] for u in listed] == [member]
    keys = daemon.call_as(member, "key.list")["result"]
    assert keys == []
    tokens = daemon.call_as(member, "token.list")["result"]
    assert tokens == []


def _same_shape(msg_a: str, name_a: str, msg_b: str, name_b: str) -> None:
    assert msg_a.replace(name_a, "X") == msg_b.replace(name_b, "X"), (msg_a, msg_b)


def test_member_gets_not_found_for_others(
    daemon: Daemon, member: str, other: dict[str, Any]
) -> None:
    """Another user's objects look exactly like missing ones: no existence leak."""
    o = other["name"]
    missing = o + "zz"
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("user.get", {"name": o}, {"name": missing}),
        (
            "user.update",
            {"name": o, "display_name": "pwned"},
            {"name": missing, "display_name": "x"},
        ),
        ("key.list", {"user": o}, {"user": missing}),
        ("key.add", {"user": o, "key": "ssh-ed25519 AAAA x"}, {"user": missing, "key": "x"}),
        (
            "key.remove",
            {"user": o, "fingerprint": other["fingerprint"]},
            {"user": missing, "fingerprint": other["fingerprint"]},
        ),
        ("token.list", {"user": o}, {"user": missing}),
        ("token.create", {"user": o}, {"user": missing}),
    ]
    for method, theirs, absent in cases:
        a = daemon.call_as(member, method, theirs)
        b = daemon.call_as(member, method, absent)
        assert a["error"]["code"] == -32001, (method, a)
        assert b["error"]["code"] == -32001, (method, b)
        _same_shape(a["error"]["message"], o, b["error"]["message"], missing)
    # A truly missing user, asked by an admin, is not found too.
    assert daemon.error("user.get", name=missing).code == -32001
    fake_id = secrets.token_hex(6)
    a = daemon.call_as(member, "token.revoke", {"id": other["token_id"]})
    b = daemon.call_as(member, "token.revoke", {"id": fake_id})
    assert a["error"]["code"] == b["error"]["code"] == -32001
    _same_shape(a["error"]["message"], other["token_id"], b["error"]["message"], fake_id)
    # Nothing of the other user changed.
    got = daemon.call("user.get", name=o)
    assert got["display_name"] == "" and got["keys"] == 1
    assert daemon.call("token.list", user=o)[0]["state"] == "active"
    # And audit events of others stay hidden.
    assert daemon.call_as(member, "audit.list", {"actor": o})["result"] == []


# -- admins on the socket ------------------------------------------------------


def test_root_is_admin(daemon: Daemon) -> None:
    who = daemon.call("auth.whoami")
    assert who == {"name": "root", "role": "admin", "right": "admin", "via": "unix", "token": None}


def test_admin_user_may_do_everything(
    daemon: Daemon, admin_user: str, other: dict[str, Any], name: str, keypair: tuple[Path, str]
) -> None:
    o = other["name"]

    def ok(method: str, params: Any = None) -> Any:
        resp = daemon.call_as(admin_user, method, params)
        assert "result" in resp, (method, resp)
        return resp["result"]

    assert ok("auth.whoami")["right"] == "admin"
    assert ok("user.get", {"name": o})["name"] == o
    assert {admin_user, o} <= {u["name"] for u in ok("user.list")}
    assert ok("user.update", {"name": o, "max_cpu": 2})["max_cpu"] == 2
    assert len(ok("key.list", {"user": o})) == 1
    ok("key.remove", {"user": o, "fingerprint": other["fingerprint"]})
    assert ok("token.list", {"user": o})[0]["id"] == other["token_id"]
    assert ok("token.revoke", {"id": other["token_id"]})["state"] == "revoked"
    assert ok("token.create", {"user": o, "right": "write"})["user"] == o
    assert any(e["actor"] == "root" for e in ok("audit.list"))
    new = name + "n"
    try:
        assert ok("user.create", {"name": new})["name"] == new
        ok("key.add", {"user": new, "key": keypair[1]})
    finally:
        assert ok("user.delete", {"name": new}) == {"deleted": new}


# -- TCP with tokens -----------------------------------------------------------


def test_tcp_without_token_gets_only_public(daemon: Daemon) -> None:
    c = daemon.client(tcp=True)
    try:
        assert c.call("rpc.health")["status"] == "ok"
        assert c.call("rpc.discover")["openrpc"].startswith("1.3")
        assert c.call("auth.whoami")["via"] == "tcp"
        assert c.call("auth.whoami")["role"] == "anonymous"
        for m in NON_PUBLIC:
            with pytest.raises(RpcError) as info:
                c.call(m, {})
            assert info.value.code == -32006, m
            assert "Bearer" in info.value.message
    finally:
        c.close()


def _tcp(daemon: Daemon, token: str) -> Any:
    return daemon.client(token=token, tcp=True)


def _err(c: Any, method: str, params: dict[str, Any]) -> RpcError:
    with pytest.raises(RpcError) as info:
        c.call(method, params)
    return info.value


def test_read_token(daemon: Daemon, member: str, keypair: tuple[Path, str]) -> None:
    tok = daemon.call("token.create", user=member, right="read")
    c = _tcp(daemon, tok["token"])
    try:
        who = c.call("auth.whoami")
        assert (who["name"], who["right"], who["via"], who["token"]) == (
            member,
            "read",
            "tcp",
            tok["id"],
        )
        assert c.call("user.get", {"name": member})["name"] == member
        assert [u["name"] for u in c.call("user.list")] == [member]
        assert c.call("key.list") == []
        assert c.call("token.list")[0]["id"] == tok["id"]
        c.call("audit.list")
        for method, params in [
            ("user.update", {"name": member, "display_name": "x"}),
            ("key.add", {"user": member, "key": keypair[1]}),
            ("token.create", {"right": "read"}),
            ("token.revoke", {"id": tok["id"]}),
        ]:
            err = _err(c, method, params)
            assert err.code == -32003, method
            assert "'write'" in err.message and "'read'" in err.message
        assert _err(c, "user.create", {"name": member + "x"}).code == -32003
    finally:
        c.close()
    assert daemon.call("user.get", name=member)["display_name"] == ""
    assert daemon.call("key.list", user=member) == []
    assert daemon.call("token.list", user=member)[0]["state"] == "active"


def test_write_token(daemon: Daemon, member: str, keypair: tuple[Path, str]) -> None:
    tok = daemon.call("token.create", user=member, right="write")
    c = _tcp(daemon, tok["token"])
    try:
        assert c.call("user.update", {"name": member, "display_name": "W"})["display_name"] == "W"
        fp = c.call("key.add", {"user": member, "key": keypair[1]})["fingerprint"]
        sub = c.call("token.create", {"right": "read"})
        assert sub["user"] == member
        c.call("token.revoke", {"id": sub["id"]})
        c.call("key.remove", {"user": member, "fingerprint": fp})
        assert _err(c, "user.create", {"name": member + "x"}).code == -32003
        assert _err(c, "user.delete", {"name": member}).code == -32003
        assert _err(c, "user.update", {"name": member, "role": "admin"}).code == -32003
        err = _err(c, "token.create", {"right": "admin"})
        assert err.code == -32003
    finally:
        c.close()
    c = daemon.client()
    try:
        events = c.call("audit.list", {"actor": member, "method": "key.add"})
    finally:
        c.close()
    assert events[0]["via"] == "tcp"


def test_member_cannot_create_admin_token(daemon: Daemon, member: str) -> None:
    resp = daemon.call_as(member, "token.create", {"right": "admin"})
    assert resp["error"]["code"] == -32003
    assert "member" in resp["error"]["message"]
    # Not even an admin can give a member an admin token.
    err = daemon.error("token.create", user=member, right="admin")
    assert err.code == -32003
    assert daemon.call("token.list", user=member) == []


def test_admin_tokens(daemon: Daemon, admin_user: str, name: str) -> None:
    admin_tok = daemon.call("token.create", user=admin_user, right="admin")
    write_tok = daemon.call("token.create", user=admin_user, right="write")
    new = name + "t"
    c = _tcp(daemon, admin_tok["token"])
    w = _tcp(daemon, write_tok["token"])
    try:
        assert c.call("auth.whoami")["right"] == "admin"
        # An admin's write token is no admin credential.
        assert _err(w, "user.create", {"name": new}).code == -32003
        err = _err(w, "token.create", {"right": "admin"})
        assert err.code == -32003 and "more than your own" in err.message
        assert c.call("user.create", {"name": new})["name"] == new
        assert c.call("user.delete", {"name": new}) == {"deleted": new}
        # A demoted admin's admin token is capped at write at once.
        daemon.call("user.update", name=admin_user, role="member")
        who = c.call("auth.whoami")
        assert (who["role"], who["right"]) == ("member", "write")
        assert _err(c, "user.create", {"name": new}).code == -32003
    finally:
        c.close()
        w.close()
    assert daemon.error("user.get", name=new).code == -32001
