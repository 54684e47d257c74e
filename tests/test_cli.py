"""The `den` CLI through subprocess, against the real daemon."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, ssh_key


def js(res: Any) -> Any:
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr}"
    return json.loads(res.stdout)


@pytest.fixture
def user(daemon: Daemon, name: str) -> Iterator[str]:
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        try:
            daemon.call("user.delete", name=name)
        except Exception:  # noqa: BLE001 - the test may have deleted it already
            pass


def test_health(daemon: Daemon) -> None:
    res = daemon.cli("health", check=True)
    assert "ok" in res.stdout
    assert js(daemon.cli("health", "--json"))["status"] == "ok"


def test_user_add_with_key_ls_and_rm(daemon: Daemon, name: str, keypair: tuple[Path, str]) -> None:
    priv, pub = keypair
    try:
        res = daemon.cli("user", "add", name, "--key", str(priv.with_suffix(".pub")), check=True)
        assert name in res.stdout
        users = js(daemon.cli("user", "ls", "--json"))
        assert isinstance(users, list)
        mine = [u for u in users if u["name"] == name]
        assert len(mine) == 1 and mine[0]["keys"] == 1 and mine[0]["role"] == "member"
        keys = js(daemon.cli("key", "ls", name, "--json"))
        assert [k["comment"] for k in keys] == ["k"]
        res = daemon.cli("key", "ls", name, check=True)
        assert keys[0]["fingerprint"] in res.stdout
        # A table for people.
        res = daemon.cli("user", "ls", check=True)
        assert name in res.stdout and "role" in res.stdout
    finally:
        res = daemon.cli("user", "rm", name, "--yes")
    assert res.returncode == 0, res.stderr
    assert name not in {u["name"] for u in daemon.call("user.list")}


def test_user_add_admin(daemon: Daemon, name: str) -> None:
    try:
        out = js(daemon.cli("user", "add", name, "--admin", "--json"))
        assert out["role"] == "admin" and out["name"] == name
    finally:
        daemon.call("user.delete", name=name)


def test_key_add_and_rm(daemon: Daemon, user: str, tmp_path: Path) -> None:
    _priv, pub = ssh_key(tmp_path, "laptop")
    pub_file = tmp_path / "laptop.pub"
    pub_file.write_text(pub + "\n")
    added = js(daemon.cli("key", "add", user, str(pub_file), "--json"))
    assert added["user"] == user and added["fingerprint"].startswith("SHA256:")
    # The same key again: a conflict, exit 5, the server's message.
    res = daemon.cli("key", "add", user, str(pub_file))
    assert res.returncode == 5
    assert "already" in res.stderr and added["fingerprint"] in res.stderr
    # From stdin.
    _priv2, pub2 = ssh_key(tmp_path, "desk")
    res = daemon.cli("key", "add", user, "-", input=pub2)
    assert res.returncode == 0, res.stderr
    assert len(js(daemon.cli("key", "ls", user, "--json"))) == 2
    res = daemon.cli("key", "rm", user, added["fingerprint"])
    assert res.returncode == 0, res.stderr
    keys = js(daemon.cli("key", "ls", user, "--json"))
    assert [k["comment"] for k in keys] == ["desk"]
    res = daemon.cli("key", "rm", user, added["fingerprint"])
    assert res.returncode == 3 and "no key" in res.stderr


def test_key_add_rejects_private_key(daemon: Daemon, user: str, tmp_path: Path) -> None:
    priv, _pub = ssh_key(tmp_path)
    res = daemon.cli("key", "add", user, str(priv))
    assert res.returncode == 2
    assert "private key" in res.stderr


def test_key_add_missing_file(daemon: Daemon, user: str, tmp_path: Path) -> None:
    res = daemon.cli("key", "add", user, str(tmp_path / "nope.pub"))
    assert res.returncode == 2
    assert "cannot read" in res.stderr


def test_tokens(daemon: Daemon, user: str) -> None:
    created = js(
        daemon.cli("token", "create", "--user", user, "--right", "read", "--description", "ci", "--json")
    )
    assert created["token"].startswith("den_") and created["right"] == "read"
    tid = created["id"]
    listed = js(daemon.cli("token", "ls", "--json"))
    mine = [t for t in listed if t["id"] == tid]
    assert mine and mine[0]["state"] == "active" and "token" not in mine[0]
    assert created["token"] not in json.dumps(listed)
    res = daemon.cli("token", "ls", check=True)
    assert tid in res.stdout and created["token"] not in res.stdout
    res = daemon.cli("token", "revoke", tid, check=True)
    assert "revoked" in res.stdout
    listed = js(daemon.cli("token", "ls", "--user", user, "--json"))
    assert [t["state"] for t in listed if t["id"] == tid] == ["revoked"]


def test_token_create_prints_note(daemon: Daemon, user: str) -> None:
    res = daemon.cli("token", "create", "--user", user, check=True)
    assert "den_" in res.stdout
    assert "cannot show it again" in res.stderr


def test_token_create_as_root_needs_user(daemon: Daemon) -> None:
    res = daemon.cli("token", "create")
    assert res.returncode == 2
    assert "not a den user" in res.stderr


def test_token_over_tcp(daemon: Daemon, user: str) -> None:
    token = daemon.call("token.create", user=user, right="read")["token"]
    res = daemon.cli("--url", daemon.http_url, "--token", token, "whoami", "--json")
    who = js(res)
    assert who["name"] == user and who["via"] == "tcp" and who["right"] == "read"
    # Read works, write does not (exit 4: forbidden).
    assert [u["name"] for u in js(daemon.cli("--url", daemon.http_url, "--token", token, "user", "ls", "--json"))] == [user]
    res = daemon.cli("--url", daemon.http_url, "--token", token, "user", "set", user, "--display-name", "X")
    assert res.returncode == 4 and "write" in res.stderr


def test_bad_token_over_tcp(daemon: Daemon) -> None:
    res = daemon.cli("--url", daemon.http_url, "--token", "den_abc_wrong", "user", "ls")
    assert res.returncode == 4
    assert "unknown token" in res.stderr


def test_audit(daemon: Daemon, user: str) -> None:
    events = js(daemon.cli("audit", "--target", f"user:{user}", "--json"))
    assert isinstance(events, list)
    assert [e["method"] for e in events] == ["user.create"]
    assert events[0]["outcome"] == "ok" and events[0]["actor"] == "root"
    res = daemon.cli("audit", "--target", f"user:{user}", check=True)
    assert "user.create" in res.stdout
    res = daemon.cli("audit", "--since", "yesterday-ish")
    assert res.returncode == 2 and "since" in res.stderr


def test_rpc_raw(daemon: Daemon, user: str) -> None:
    out = js(daemon.cli("rpc", "user.get", json.dumps({"name": user})))
    assert out["name"] == user
    out = js(daemon.cli("rpc", "user.get", json.dumps([user])))
    assert out["name"] == user
    assert js(daemon.cli("rpc", "rpc.health"))["status"] == "ok"


def test_rpc_invalid_json(daemon: Daemon) -> None:
    res = daemon.cli("rpc", "user.get", "{name: bob")
    assert res.returncode == 2
    assert "not valid JSON" in res.stderr
    assert res.stdout == ""


def test_rpc_unknown_method(daemon: Daemon) -> None:
    res = daemon.cli("rpc", "no.such", "{}")
    assert res.returncode == 1
    assert "Method not found" in res.stderr and "no.such" in res.stderr


def test_rpc_invalid_params(daemon: Daemon) -> None:
    res = daemon.cli("rpc", "user.get", '{"name": 5, "extra": 1}')
    assert res.returncode == 2
    assert "Invalid params" in res.stderr
    assert "extra: unknown field" in res.stderr


def test_unknown_user_fails(daemon: Daemon) -> None:
    res = daemon.cli("user", "show", "nobody-here")
    assert res.returncode == 3
    assert "nobody-here" in res.stderr
    res = daemon.cli("user", "rm", "nobody-here", "--yes")
    assert res.returncode == 3 and "nobody-here" in res.stderr


def test_conflict_exit_code(daemon: Daemon, user: str) -> None:
    res = daemon.cli("user", "add", user)
    assert res.returncode == 5
    assert user in res.stderr and "exists" in res.stderr


def test_bad_name_exit_code(daemon: Daemon) -> None:
    res = daemon.cli("user", "add", "Bad;Name")
    assert res.returncode == 2
    assert "name:" in res.stderr


def test_user_rm_needs_confirmation(daemon: Daemon, user: str) -> None:
    res = daemon.cli("user", "rm", user, input="")
    assert res.returncode != 0
    assert "--yes" in res.stderr
    assert daemon.call("user.get", name=user)["name"] == user
    res = daemon.cli("user", "rm", user, "--yes")
    assert res.returncode == 0, res.stderr
    assert daemon.error("user.get", name=user).code == -32001


def test_unreachable_daemon(daemon: Daemon, tmp_path: Path) -> None:
    res = daemon.cli("--socket", str(tmp_path / "none.sock"), "health")
    assert res.returncode == 69
    assert "cannot reach den" in res.stderr


def test_member_cli_as_host_account(daemon: Daemon, user: str) -> None:
    who = js(daemon.cli("whoami", "--json", user=user))
    assert who == {"name": user, "role": "member", "right": "write", "via": "unix", "token": None}
    res = daemon.cli("whoami", user=user)
    assert res.returncode == 0 and user in res.stdout
    assert [u["name"] for u in js(daemon.cli("user", "ls", "--json", user=user))] == [user]
    res = daemon.cli("user", "add", "another-one", user=user)
    assert res.returncode == 4 and "admin" in res.stderr
    res = daemon.cli("user", "show", "root", user=user)
    assert res.returncode == 3


def test_show_completion(daemon: Daemon) -> None:
    res = daemon.cli("--show-completion", "bash", check=True)
    assert "complete" in res.stdout and "_DEN_COMPLETE" in res.stdout


def test_completion_by_environment(daemon: Daemon) -> None:
    import subprocess

    from tests.conftest import DEN

    env = {**daemon.env, "_DEN_COMPLETE": "complete_bash", "COMP_WORDS": "den us", "COMP_CWORD": "1"}
    res = subprocess.run([DEN], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert res.stdout.split() == ["user"]
    env.update(COMP_WORDS="den user ", COMP_CWORD="2")
    res = subprocess.run([DEN], env=env, capture_output=True, text=True, timeout=60)
    assert {"add", "ls", "rm", "show", "set"} <= set(res.stdout.split())


def test_no_args_prints_help(daemon: Daemon) -> None:
    res = daemon.cli()
    assert "Usage" in res.stdout + res.stderr
    res = daemon.cli("user")
    assert "add" in res.stdout + res.stderr
