"""Bad durations, sizes and names get -32602 naming the field and the limit, never -32603."""

from __future__ import annotations

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon
from tests.workspaces.conftest import BB, Users, create, invalid

HUGE = ["99999999d", "1e308s", "9" * 60 + "d", "367d", "inf", "nan", "-5m"]


def test_durations_are_bounded_over_rpc(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    owner = users.make()
    ref = create(d, owner, "dur", image=BB)["ref"]
    for bad in HUGE:
        invalid(d, "workspace.metrics", "since", ref=ref, since=bad)
        invalid(d, "workspace.idle", "suspend", ref=ref, suspend=bad)
        invalid(d, "workspace.idle", "stop", ref=ref, stop=bad)
        invalid(d, "user.idle", "suspend", user=owner, suspend=bad)
        invalid(d, "audit.list", "since", since=bad)
        invalid(d, "token.create", "expires", user=owner, expires=bad)
    assert "366 days" in invalid(d, "workspace.idle", "suspend", ref=ref, suspend="99999999d")
    assert "366 days" in invalid(d, "workspace.metrics", "since", ref=ref, since="99999999d")
    # The longest allowed, and the usual forms, still work.
    assert d.call("workspace.idle", ref=ref, suspend="366d")["idle_suspend"] == 366 * 86400
    assert d.call("workspace.idle", ref=ref, suspend="1.5h")["idle_suspend"] == 5400
    assert d.call("workspace.idle", ref=ref, suspend="1h30m", stop="600")["idle_stop"] == 600
    assert isinstance(d.call("workspace.metrics", ref=ref, since="366d"), list)


def test_sizes_are_bounded_over_rpc(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    owner = users.make()
    ref = create(d, owner, "size", image=BB)["ref"]
    for bad in ("9999999999999T", "9" * 40, "2048T"):
        msg = invalid(d, "workspace.resize", "mem", ref=ref, mem=bad)
        assert "limit" in msg or "at most" in msg, msg
        msg = invalid(d, "workspace.create", "disk", name="big", user=owner, image=BB, disk=bad)
        assert "limit" in msg or "at most" in msg or "disk_quota" in msg, msg


def test_bad_input_through_the_cli(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    d = pool_daemon
    owner = users.make()
    ref = create(d, owner, "cli", image=BB)["ref"]
    for args in (
        ("metrics", ref, "--since", "99999999d"),
        ("idle", ref, "--suspend", "1e308s"),
        ("idle", ref, "--suspend", "99999999d"),
    ):
        res = d.cli(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert "Invalid params" in res.stderr and "Internal error" not in res.stderr, res.stderr
    # Numbers past what JSON carries, and non-finite ones, stop in the CLI.
    for args in (("--pids", "9" * 25), ("--cpu", "nan"), ("--cpu", "inf")):
        res = d.cli("new", "toobig", "--user", owner, "--image", BB, *args)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    # --env KEY=VALUE, repeated, beside the JSON object form.
    res = d.cli(
        "exec",
        ref,
        "--env",
        "A=1",
        "--env",
        "B=x=y",
        "--env",
        '{"C": "3"}',
        "--",
        "sh",
        "-c",
        'echo "$A|$B|$C"',
    )
    assert res.returncode == 0 and res.stdout == "1|x=y|3\n", (res.stdout, res.stderr)
    res = d.cli("exec", ref, "--env", "NOVALUE", "--", "true")
    assert res.returncode == 2 and "KEY=VALUE" in res.stderr, res.stderr


@pytest.mark.parametrize("null", ["null", "None", "", "NULL"])
def test_null_like_user_is_refused(
    pool_daemon: Daemon, bb_image: str, users: Users, null: str
) -> None:
    d = pool_daemon
    owner = users.make()
    before = {w["ref"] for w in d.call("workspace.list", all=True)}
    res = d.cli("new", "nulluser", "--user", null, "--image", BB, user=None)
    assert res.returncode == 2 and "not a user name" in res.stderr, res.stderr
    res = d.cli("user", "idle", null, "--suspend", "1h")
    assert res.returncode == 2, res.stderr
    # Over RPC the string "null" is a name like any other: no such user.
    with pytest.raises(RpcError) as info:
        d.call("workspace.create", name="nulluser", user="null", image=BB)
    assert info.value.code in (-32001, -32602), info.value
    assert {w["ref"] for w in d.call("workspace.list", all=True)} == before
    assert d.call("workspace.list", user=owner) == []


@pytest.mark.parametrize("name", ["null", "none", "nil"])
def test_null_like_user_names_are_reserved(pool_daemon: Daemon, name: str) -> None:
    assert "reserved" in invalid(pool_daemon, "user.create", "name", name=name)
