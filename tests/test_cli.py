"""The `den` CLI against the real daemon.

The main paths run `den` as a subprocess, as an operator would; the many
smaller cases run the same Typer app in-process (a subprocess costs about a
second of imports), still talking to the real daemon over its socket.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from den.cli.main import build
from tests.conftest import DEN, Daemon, ssh_key


@dataclass
class Res:
    returncode: int
    stdout: str
    stderr: str


def run(daemon: Daemon, *args: str, input: str = "") -> Res:
    """Run the CLI in-process with the daemon's environment."""
    res = CliRunner().invoke(build(), list(args), input=input, env=daemon.env, prog_name="den")
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Res(res.exit_code, res.stdout, res.stderr)


def cli_as(daemon: Daemon, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `den` as the host account of den user ``user``."""
    return subprocess.run(
        [DEN, *args], input="", capture_output=True, text=True, timeout=60, **daemon._as(user)
    )


def js(res: Res | subprocess.CompletedProcess[str]) -> Any:
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr}"
    return json.loads(res.stdout)


@pytest.fixture
def user(daemon: Daemon, name: str) -> Iterator[str]:
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        if name in {u["name"] for u in daemon.call("user.list")}:
            daemon.call("user.delete", name=name)


# -- through subprocess ----------------------------------------------------------


def test_health(daemon: Daemon) -> None:
    res = daemon.cli("health", check=True)
    assert "status" in res.stdout and "ok" in res.stdout
    assert js(run(daemon, "health", "--json"))["status"] == "ok"


def test_user_add_with_key_ls_and_rm(daemon: Daemon, name: str, keypair: tuple[Path, str]) -> None:
    priv, pub = keypair
    try:
        res = daemon.cli("user", "add", name, "--key", str(priv.with_suffix(".pub")), check=True)
        assert name in res.stdout
        users = js(daemon.cli("user", "ls", "--json"))
        assert isinstance(users, list)
        mine = [u for u in users if u["name"] == name]
        assert len(mine) == 1 and mine[0]["keys"] == 1 and mine[0]["role"] == "member"
        keys = js(run(daemon, "key", "ls", name, "--json"))
        assert [k["comment"] for k in keys] == ["k"]
        assert pub.split()[1] not in json.dumps(keys)  # fingerprints, not key material
        # Tables for people keep whole cells even when piped.
        res2 = run(daemon, "key", "ls", name)
        assert keys[0]["fingerprint"] in res2.stdout
        res2 = run(daemon, "user", "ls")
        assert name in res2.stdout and "role" in res2.stdout
        # Without --yes and without a terminal, rm refuses and changes nothing.
        res = daemon.cli("user", "rm", name, input="")
        assert res.returncode != 0
        assert "--yes" in res.stderr
        assert daemon.call("user.get", name=name)["name"] == name
    finally:
        res = daemon.cli("user", "rm", name, "--yes")
    assert res.returncode == 0, res.stderr
    assert name not in {u["name"] for u in daemon.call("user.list")}


def test_token_create_json(daemon: Daemon, user: str) -> None:
    res = daemon.cli("token", "create", "--user", user, "--right", "read", "--json")
    created = js(res)
    assert created["token"].startswith("den_") and created["right"] == "read"
    assert created["user"] == user and created["state"] == "active"
    # For people, a note to store the secret, on stderr.
    res2 = run(daemon, "token", "create", "--user", user)
    assert res2.returncode == 0 and "den_" in res2.stdout
    assert "cannot show it again" in res2.stderr and "den_" not in res2.stderr


def test_token_over_tcp(daemon: Daemon, user: str) -> None:
    token = daemon.call("token.create", user=user, right="read")["token"]
    res = daemon.cli("--url", daemon.http_url, "--token", token, "whoami", "--json")
    who = js(res)
    assert who["name"] == user and who["via"] == "tcp" and who["right"] == "read"
    # The same with the token in the environment, in-process.
    base = ["--url", daemon.http_url, "--token", token]
    assert [u["name"] for u in js(run(daemon, *base, "user", "ls", "--json"))] == [user]
    res2 = run(daemon, *base, "user", "set", user, "--display-name", "X")
    assert res2.returncode == 4 and "write" in res2.stderr


def test_rpc_raw(daemon: Daemon, user: str) -> None:
    out = js(run(daemon, "rpc", "user.get", json.dumps({"name": user})))
    assert out["name"] == user
    out = js(run(daemon, "rpc", "user.get", json.dumps([user])))
    assert out["name"] == user
    assert js(run(daemon, "rpc", "rpc.health"))["status"] == "ok"


def test_rpc_invalid_json(daemon: Daemon) -> None:
    res = daemon.cli("rpc", "user.get", "{name: bob")
    assert res.returncode == 2
    assert "params are not valid JSON" in res.stderr
    assert res.stdout == ""


def test_unknown_user_fails(daemon: Daemon) -> None:
    res = daemon.cli("user", "show", "nobody-here")
    assert res.returncode == 3
    assert "nobody-here" in res.stderr and "error" in res.stderr
    assert res.stdout == ""
    res2 = run(daemon, "user", "rm", "nobody-here", "--yes")
    assert res2.returncode == 3 and "nobody-here" in res2.stderr


def test_member_cli_as_host_account(daemon: Daemon, user: str) -> None:
    # conftest's daemon.cli(..., user=...) passes env twice; call the account directly.
    who = js(cli_as(daemon, user, "whoami", "--json"))
    assert who == {"name": user, "role": "member", "right": "write", "via": "unix", "token": None}
    res = cli_as(daemon, user, "user", "add", "another-one")
    assert res.returncode == 4 and "admin" in res.stderr


def test_show_completion(daemon: Daemon) -> None:
    res = daemon.cli("--show-completion", "bash", check=True)
    assert "complete" in res.stdout and "_DEN_COMPLETE" in res.stdout


def test_completion_by_environment(daemon: Daemon) -> None:
    env = {
        **daemon.env,
        "_DEN_COMPLETE": "complete_bash",
        "COMP_WORDS": "den user ",
        "COMP_CWORD": "2",
    }
    res = subprocess.run([DEN], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    assert {"add", "ls", "rm", "show", "set"} <= set(res.stdout.split())


# -- in-process ------------------------------------------------------------------


def test_user_add_admin(daemon: Daemon, name: str) -> None:
    try:
        out = js(run(daemon, "user", "add", name, "--admin", "--json"))
        assert out["role"] == "admin" and out["name"] == name
    finally:
        daemon.call("user.delete", name=name)


def test_user_show_and_set(daemon: Daemon, user: str) -> None:
    out = js(
        run(daemon, "user", "set", user, "--display-name", "Ada L.", "--max-cpu", "4", "--json")
    )
    assert out["display_name"] == "Ada L." and out["max_cpu"] == 4
    res = run(daemon, "user", "show", user)
    assert res.returncode == 0 and "Ada L." in res.stdout


def test_markup_in_data_is_printed_as_is(daemon: Daemon, user: str) -> None:
    """User data that looks like Rich markup is data, not markup."""
    daemon.call("user.update", name=user, display_name="[/bold] [red]x")
    res = run(daemon, "user", "ls")
    assert res.returncode == 0, res.stderr
    assert "[/bold] [red]x" in res.stdout
    res = run(daemon, "user", "show", user)
    assert res.returncode == 0 and "[/bold] [red]x" in res.stdout
    res = run(daemon, "audit", "--since", "[/x]")
    assert res.returncode == 2 and "'[/x]'" in res.stderr


def test_key_add_and_rm(daemon: Daemon, user: str, tmp_path: Path) -> None:
    _priv, pub = ssh_key(tmp_path, "laptop")
    pub_file = tmp_path / "laptop.pub"
    pub_file.write_text(pub + "\n")
    added = js(run(daemon, "key", "add", user, str(pub_file), "--json"))
    assert added["user"] == user and added["fingerprint"].startswith("SHA256:")
    # The same key again: a conflict, exit 5, the server's message.
    res = run(daemon, "key", "add", user, str(pub_file))
    assert res.returncode == 5
    assert "already" in res.stderr and added["fingerprint"] in res.stderr
    # From stdin.
    _priv2, pub2 = ssh_key(tmp_path, "desk")
    res = run(daemon, "key", "add", user, "-", input=pub2)
    assert res.returncode == 0, res.stderr
    assert len(js(run(daemon, "key", "ls", user, "--json"))) == 2
    res = run(daemon, "key", "rm", user, added["fingerprint"])
    assert res.returncode == 0, res.stderr
    keys = js(run(daemon, "key", "ls", user, "--json"))
    assert [k["comment"] for k in keys] == ["desk"]
    res = run(daemon, "key", "rm", user, added["fingerprint"])
    assert res.returncode == 3 and "no key" in res.stderr


def test_key_add_rejects_private_key(daemon: Daemon, user: str, tmp_path: Path) -> None:
    priv, _pub = ssh_key(tmp_path)
    res = run(daemon, "key", "add", user, str(priv))
    assert res.returncode == 2
    assert "private key" in res.stderr
    assert js(run(daemon, "key", "ls", user, "--json")) == []


def test_key_add_missing_file(daemon: Daemon, user: str, tmp_path: Path) -> None:
    res = run(daemon, "key", "add", user, str(tmp_path / "nope.pub"))
    assert res.returncode == 2
    assert "cannot read" in res.stderr


def test_tokens_ls_and_revoke(daemon: Daemon, user: str) -> None:
    created = js(run(daemon, "token", "create", "--user", user, "--description", "ci", "--json"))
    tid = created["id"]
    listed = js(run(daemon, "token", "ls", "--json"))
    mine = [t for t in listed if t["id"] == tid]
    assert mine and mine[0]["state"] == "active" and mine[0]["description"] == "ci"
    assert "token" not in mine[0]
    assert created["token"] not in json.dumps(listed)
    res = run(daemon, "token", "ls")
    assert tid in res.stdout and created["token"] not in res.stdout
    res = run(daemon, "token", "revoke", tid)
    assert res.returncode == 0 and "revoked" in res.stdout
    listed = js(run(daemon, "token", "ls", "--user", user, "--json"))
    assert [t["state"] for t in listed if t["id"] == tid] == ["revoked"]
    res = run(daemon, "token", "revoke", "nosuchtoken")
    assert res.returncode == 3 and "nosuchtoken" in res.stderr


def test_token_create_as_root_needs_user(daemon: Daemon) -> None:
    res = run(daemon, "token", "create")
    assert res.returncode == 2
    assert "not a den user" in res.stderr


def test_bad_token_over_tcp(daemon: Daemon) -> None:
    res = run(daemon, "--url", daemon.http_url, "--token", "den_abc_wrong", "user", "ls")
    assert res.returncode == 4
    assert "unknown token" in res.stderr


def test_audit(daemon: Daemon, user: str) -> None:
    events = js(run(daemon, "audit", "--target", f"user:{user}", "--json"))
    assert isinstance(events, list)
    assert [e["method"] for e in events] == ["user.create"]
    assert events[0]["outcome"] == "ok" and events[0]["actor"] == "root"
    res = run(daemon, "audit", "--target", f"user:{user}")
    assert res.returncode == 0 and "user.create" in res.stdout and f"user:{user}" in res.stdout
    res = run(daemon, "audit", "--since", "yesterday-ish")
    assert res.returncode == 2 and "since" in res.stderr


def test_rpc_unknown_method(daemon: Daemon) -> None:
    res = run(daemon, "rpc", "no.such", "{}")
    assert res.returncode == 1
    assert "Method not found" in res.stderr and "no.such" in res.stderr


def test_rpc_invalid_params(daemon: Daemon) -> None:
    res = run(daemon, "rpc", "user.get", '{"name": 5, "extra": 1}')
    assert res.returncode == 2
    assert "Invalid params" in res.stderr
    assert "extra: unknown field" in res.stderr
    assert "name: Input should be a valid string" in res.stderr


def test_conflict_exit_code(daemon: Daemon, user: str) -> None:
    res = run(daemon, "user", "add", user)
    assert res.returncode == 5
    assert user in res.stderr and "exists" in res.stderr


def test_bad_name_exit_code(daemon: Daemon) -> None:
    res = run(daemon, "user", "add", "Bad;Name")
    assert res.returncode == 2
    assert "name:" in res.stderr


def test_unreachable_daemon(daemon: Daemon, tmp_path: Path) -> None:
    res = run(daemon, "--socket", str(tmp_path / "none.sock"), "health")
    assert res.returncode == 69
    assert "cannot reach den" in res.stderr


def test_no_args_prints_help(daemon: Daemon) -> None:
    res = run(daemon)
    assert "Usage" in res.stdout + res.stderr
    res = run(daemon, "user")
    assert "add" in res.stdout + res.stderr
