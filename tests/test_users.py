"""user.create/get/list/update/delete and the host Linux accounts behind users."""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")


def subid_lines(path: Path, account: str) -> list[tuple[int, int]]:
    out = []
    for line in path.read_text().splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] == account:
            out.append((int(parts[1]), int(parts[2])))
    return out


def account_exists(account: str) -> bool:
    try:
        pwd.getpwnam(account)
    except KeyError:
        return False
    return True


@pytest.fixture
def user(daemon: Daemon, name: str) -> Iterator[str]:
    """A member created for the test and deleted afterwards."""
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        if account_exists(daemon.prefix + name):
            daemon.client().call("user.delete", {"name": name})


def test_create_get_list_delete(daemon: Daemon, name: str) -> None:
    created = daemon.call("user.create", name=name, display_name="Zoë Ünïcode 日本")
    try:
        assert created["name"] == name
        assert created["role"] == "member"
        assert created["account"] == daemon.prefix + name
        assert created["display_name"] == "Zoë Ünïcode 日本"
        assert created["keys"] == 0
        got = daemon.call("user.get", name=name)
        assert got == created
        names = [u["name"] for u in daemon.call("user.list")]
        assert name in names
        assert names == sorted(names)
    finally:
        assert daemon.call("user.delete", name=name) == {"deleted": name}
    err = daemon.error("user.get", name=name)
    assert err.code == -32001
    assert name not in [u["name"] for u in daemon.call("user.list")]
    err = daemon.error("user.delete", name=name)
    assert err.code == -32001


def test_host_account(daemon: Daemon, user: str) -> None:
    account = daemon.prefix + user
    pw = pwd.getpwnam(account)
    info = daemon.call("user.get", name=user)
    assert info["uid"] == pw.pw_uid
    assert pw.pw_gecos.startswith("den managed account")
    assert pw.pw_shell.endswith("nologin")
    group = grp.getgrnam(daemon.group)
    assert account in group.gr_mem
    uids = subid_lines(SUBUID, account)
    gids = subid_lines(SUBGID, account)
    assert len(uids) == 1 and len(gids) == 1
    start, count = uids[0]
    assert start >= 100000 and count == 65536
    assert gids[0][0] >= 100000 and gids[0][1] == 65536
    assert (info["subuid_start"], info["subuid_count"]) == (start, count)


def test_subid_ranges_do_not_overlap(daemon: Daemon, name: str) -> None:
    a, b = name + "a", name + "b"
    daemon.call("user.create", name=a)
    try:
        daemon.call("user.create", name=b)
        try:
            for path in (SUBUID, SUBGID):
                (sa, ca), (sb, cb) = (
                    subid_lines(path, daemon.prefix + a)[0],
                    subid_lines(path, daemon.prefix + b)[0],
                )
                assert sa + ca <= sb or sb + cb <= sa, (path, sa, ca, sb, cb)
            # Nor does either overlap any other range on the host.
            for path in (SUBUID, SUBGID):
                lines = [ln.split(":") for ln in path.read_text().splitlines()]
                mine = {daemon.prefix + a, daemon.prefix + b}
                for owner, start, count in (p for p in lines if len(p) == 3 and p[0] in mine):
                    s1, c1 = int(start), int(count)
                    for p in lines:
                        if len(p) == 3 and p[0] != owner:
                            s2, c2 = int(p[1]), int(p[2])
                            assert s1 + c1 <= s2 or s2 + c2 <= s1, (path, owner, p)
        finally:
            daemon.call("user.delete", name=b)
    finally:
        daemon.call("user.delete", name=a)


def test_delete_removes_account_and_subids(daemon: Daemon, name: str) -> None:
    account = daemon.prefix + name
    daemon.call("user.create", name=name)
    assert account_exists(account)
    assert subid_lines(SUBUID, account)
    daemon.call("user.delete", name=name)
    assert not account_exists(account)
    assert subid_lines(SUBUID, account) == []
    assert subid_lines(SUBGID, account) == []


def test_foreign_account_is_refused_and_left_alone(daemon: Daemon, name: str) -> None:
    account = daemon.prefix + name
    subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", account], check=True
    )
    try:
        before = pwd.getpwnam(account)
        err = daemon.error("user.create", name=name)
        assert err.code == -32002
        assert account in err.message and "not managed by den" in err.message
        # Nothing was stored, and the foreign account is untouched.
        assert daemon.error("user.get", name=name).code == -32001
        assert pwd.getpwnam(account) == before
        # Deleting the (missing) den user does not touch it either.
        assert daemon.error("user.delete", name=name).code == -32001
        assert account_exists(account)
    finally:
        subprocess.run(["userdel", account], capture_output=True, check=False)
    assert not account_exists(account)


def test_duplicate_name_is_a_conflict(daemon: Daemon, user: str) -> None:
    before = daemon.call("user.get", name=user)
    err = daemon.error("user.create", name=user, role="admin")
    assert err.code == -32002
    assert user in err.message and "exists" in err.message
    assert daemon.call("user.get", name=user) == before
    assert account_exists(daemon.prefix + user)


def test_name_too_long_for_account(daemon: Daemon) -> None:
    room = 32 - len(daemon.prefix)
    too_long = "z" + secrets.token_hex(16)[:room]  # room + 1 characters, still <= 31
    assert len(daemon.prefix + too_long) == 33 and len(too_long) <= 31
    err = daemon.error("user.create", name=too_long)
    assert err.code == -32602
    assert "32 characters" in str(err)
    assert not account_exists(daemon.prefix + too_long)
    assert daemon.error("user.get", name=too_long).code == -32001
    # One character less fits exactly.
    fits = too_long[:-1]
    daemon.call("user.create", name=fits)
    try:
        assert account_exists(daemon.prefix + fits)
    finally:
        daemon.call("user.delete", name=fits)


@pytest.mark.parametrize("bad", ["", "A", "1abc", "a_b", "a" * 32, "../x", "a b"])
def test_invalid_names(daemon: Daemon, bad: str) -> None:
    err = daemon.error("user.create", name=bad)
    assert err.code == -32602
    assert err.data["errors"][0]["field"] == "name"


def test_quotas_stored_and_cleared(daemon: Daemon, name: str) -> None:
    quotas = {"max_workspaces": 3, "max_cpu": 4, "max_memory_mb": 2048, "max_disk_mb": 10000}
    created = daemon.call("user.create", name=name, **quotas)
    try:
        assert {k: created[k] for k in quotas} == quotas
        assert {k: daemon.call("user.get", name=name)[k] for k in quotas} == quotas
        updated = daemon.call("user.update", name=name, max_cpu=8)
        assert updated["max_cpu"] == 8 and updated["max_workspaces"] == 3
        cleared = daemon.call("user.update", name=name, max_workspaces=-1, max_disk_mb=-1)
        assert cleared["max_workspaces"] is None and cleared["max_disk_mb"] is None
        assert cleared["max_cpu"] == 8 and cleared["max_memory_mb"] == 2048
        assert cleared["quota_defaults"] == []  # -1 is this user's own: no limit
        got = daemon.call("user.get", name=name)
        assert (got["max_workspaces"], got["max_disk_mb"]) == (None, None)
        assert daemon.error("user.update", name=name, max_cpu=-2).code == -32602
        assert daemon.error("user.update", name=name, max_cpu="many").code == -32602
    finally:
        daemon.call("user.delete", name=name)


def test_update_role_and_display_name(daemon: Daemon, user: str) -> None:
    out = daemon.call("user.update", name=user, role="admin", display_name="Boss")
    assert (out["role"], out["display_name"]) == ("admin", "Boss")
    assert daemon.call_as(user, "auth.whoami")["result"]["role"] == "admin"
    out = daemon.call("user.update", name=user, role="member")
    assert out["role"] == "member" and out["display_name"] == "Boss"
    assert daemon.error("user.update", name=user, role="god").code == -32602
    assert daemon.error("user.update", name=user, colour="red").code == -32602


def test_member_updates_own_display_name_only(daemon: Daemon, user: str) -> None:
    resp = daemon.call_as(user, "user.update", {"name": user, "display_name": "Me Myself"})
    assert resp["result"]["display_name"] == "Me Myself"
    for change in ({"role": "admin"}, {"max_cpu": 64}, {"max_workspaces": -1}):
        resp = daemon.call_as(user, "user.update", {"name": user, **change})
        assert resp["error"]["code"] == -32003, resp
    got = daemon.call("user.get", name=user)
    # Unchanged: still the server's default, not the member's 64 (nor no limit).
    assert got["role"] == "member" and "max_cpu" in got["quota_defaults"]
    assert got["max_cpu"] == 2 * (os.cpu_count() or 1)
    assert got["display_name"] == "Me Myself"


def test_member_cannot_create_or_delete_users(daemon: Daemon, user: str, name: str) -> None:
    other = name + "x"
    resp = daemon.call_as(user, "user.create", {"name": other})
    assert resp["error"]["code"] == -32003
    assert not account_exists(daemon.prefix + other)
    resp = daemon.call_as(user, "user.delete", {"name": user})
    assert resp["error"]["code"] == -32003
    assert account_exists(daemon.prefix + user)


def test_create_with_keys(daemon: Daemon, name: str, keypair: tuple[Path, str]) -> None:
    _, pub = keypair
    created = daemon.call("user.create", name=name, keys=[pub])
    try:
        assert created["keys"] == 1
        keys = daemon.call("key.list", user=name)
        assert len(keys) == 1 and keys[0]["algorithm"] == "ssh-ed25519"
    finally:
        daemon.call("user.delete", name=name)
    # The key went with the user: it can be given to someone else now.
    daemon.call("user.create", name=name + "b", keys=[pub])
    daemon.call("user.delete", name=name + "b")


def test_create_with_bad_key_changes_nothing(daemon: Daemon, name: str) -> None:
    err = daemon.error("user.create", name=name, keys=["ssh-ed25519 notbase64 x"])
    assert err.code == -32602
    assert daemon.error("user.get", name=name).code == -32001
    assert not account_exists(daemon.prefix + name)


def test_create_with_taken_key_changes_nothing(
    daemon: Daemon, user: str, name: str, keypair: tuple[Path, str]
) -> None:
    _, pub = keypair
    daemon.call("key.add", user=user, key=pub)
    other = name + "o"
    err = daemon.error("user.create", name=other, keys=[pub])
    assert err.code == -32002
    assert daemon.error("user.get", name=other).code == -32001
    assert not account_exists(daemon.prefix + other)


def test_admin_user_is_admin(daemon: Daemon, name: str) -> None:
    daemon.call("user.create", name=name, role="admin")
    daemon.call("user.create", name=name + "m")
    try:
        who = daemon.call_as(name, "auth.whoami")["result"]
        assert (who["name"], who["role"], who["right"], who["via"]) == (
            name,
            "admin",
            "admin",
            "unix",
        )
        listed = {u["name"] for u in daemon.call_as(name, "user.list")["result"]}
        assert {name, name + "m"} <= listed
        got = daemon.call_as(name, "user.get", {"name": name + "m"})["result"]
        assert got["role"] == "member"
    finally:
        daemon.call("user.delete", name=name + "m")
        daemon.call("user.delete", name=name)


def test_cli_user_add_ls_rm(daemon: Daemon, name: str, keypair: tuple[Path, str]) -> None:
    path, _ = keypair
    try:
        daemon.cli("user", "add", name, "--key", str(path.with_suffix(".pub")), check=True)
        res = daemon.cli("user", "ls", "--json", check=True)
        assert name in res.stdout
        assert account_exists(daemon.prefix + name)
        daemon.cli("user", "rm", name, "--yes", check=True)
        assert not account_exists(daemon.prefix + name)
        res = daemon.cli("user", "rm", name, "--yes")
        out = res.stderr + res.stdout
        assert res.returncode != 0 and "no user named" in out and name in out, out
    finally:
        if account_exists(daemon.prefix + name):
            daemon.call("user.delete", name=name)


def test_create_adopts_a_leftover_den_account(daemon: Daemon, name: str) -> None:
    """An account den made but whose user row is gone (a crash) is reused, not refused."""
    account = daemon.prefix + name
    marker = f"den managed account (instance {getattr(daemon, 'instance', 0)})"
    subprocess.run(
        [
            "useradd",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            marker,
            account,
        ],
        check=True,
    )
    try:
        uid = pwd.getpwnam(account).pw_uid
        created = daemon.call("user.create", name=name)
        assert created["uid"] == uid
        assert len(subid_lines(SUBUID, account)) == 1
        # It joins the socket group, so that it can reach the API.
        assert account in grp.getgrnam(daemon.group).gr_mem
        assert daemon.call_as(name, "auth.whoami")["result"]["name"] == name
        daemon.call("user.delete", name=name)
        assert not account_exists(account)
    finally:
        subprocess.run(["userdel", account], capture_output=True, check=False)


def test_concurrent_duplicate_creates(daemon: Daemon, name: str) -> None:
    """Racing creates of one name: one wins, the others get a conflict, the winner stays whole."""
    from concurrent.futures import ThreadPoolExecutor

    from den.cli.client import RpcError

    def create(_: int) -> object:
        c = daemon.client()
        try:
            return c.call("user.create", {"name": name})
        except RpcError as exc:
            return exc
        finally:
            c.close()

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(create, range(4)))
        ok = [r for r in results if isinstance(r, dict)]
        errors = [r for r in results if isinstance(r, RpcError)]
        assert len(ok) == 1, results
        assert [e.code for e in errors] == [-32002] * 3, [(e.code, e.message) for e in errors]
        assert account_exists(daemon.prefix + name)
        assert (
            daemon.call("user.get", name=name)["uid"] == pwd.getpwnam(daemon.prefix + name).pw_uid
        )
        assert daemon.call_as(name, "auth.whoami")["result"]["name"] == name
    finally:
        if account_exists(daemon.prefix + name):
            daemon.client().call("user.delete", {"name": name})


def test_same_key_twice_in_one_create(daemon: Daemon, name: str, keypair: tuple[Path, str]) -> None:
    _, pub = keypair
    err = daemon.error("user.create", name=name, keys=[pub, pub])
    assert err.code == -32602 and "twice" in str(err)
    assert daemon.error("user.get", name=name).code == -32001
    assert not account_exists(daemon.prefix + name)


def test_concurrent_creates_get_distinct_ranges(daemon: Daemon, name: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    names = [f"{name}c{i}" for i in range(4)]

    def create(n: str) -> dict[str, object]:
        c = daemon.client()
        try:
            out: dict[str, object] = c.call("user.create", {"name": n})
            return out
        finally:
            c.close()

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(create, names))
        starts = sorted(int(str(r["subuid_start"])) for r in results)
        assert all(b - a >= 65536 for a, b in itertools.pairwise(starts)), starts
        for n in names:
            assert subid_lines(SUBUID, daemon.prefix + n) == subid_lines(SUBGID, daemon.prefix + n)
    finally:
        for n in names:
            if account_exists(daemon.prefix + n):
                daemon.client().call("user.delete", {"name": n})


def test_concurrent_deletes(daemon: Daemon, name: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from den.cli.client import RpcError

    daemon.call("user.create", name=name)

    def delete(_: int) -> object:
        c = daemon.client()
        try:
            return c.call("user.delete", {"name": name})
        except RpcError as exc:
            return exc
        finally:
            c.close()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(delete, range(4)))
    assert results.count({"deleted": name}) >= 1
    errors = [r for r in results if isinstance(r, RpcError)]
    assert all(e.code == -32001 for e in errors), [(e.code, e.message) for e in errors]
    assert not account_exists(daemon.prefix + name)
    assert daemon.error("user.get", name=name).code == -32001
