"""Hostile review of the backend refactor on the sandbox side (review15,
/work/msgs/review15.md). No failing sandbox hole was found in the time given;
this guard pins what the sandbox does with ids no kernel has, which the microvm
backend gets wrong (tests/microvm/test_hostile.py)."""

from __future__ import annotations

from den.cli.client import RpcError
from tests.conftest import Daemon
from tests.workspaces.conftest import Users, create, ok, run


def test_uid_past_32_bits_fails_clearly(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    """An all-digit user not in /etc/passwd, or a passwd line (the workspace root's
    file) with a uid past 2^32-1: the command does not run, and says why (crun's
    words), never "Internal error"."""
    d = pool_daemon
    ws = create(d, users.make(), "hostileuid", image=bb_image)
    ok(d, ws["ref"], "echo 'huge:x:4294967296:0::/:/bin/sh' >> /etc/passwd", user="root")
    for user in ("99999999999", "huge"):
        try:
            res = run(d, ws["ref"], "id", "-u", user=user)
        except RpcError as err:
            assert err.code != -32603, (user, err.message)
            continue
        assert res["exit_code"] != 0 and "out of range" in res["stderr"], (user, res)
