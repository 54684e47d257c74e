"""The reconciler against operations under way: a create that commits during a
pass survives it, and a delete the host refused stays visible as ``deleting``
with its reason until a later pass finishes it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.workspaces.conftest import (
    BB,
    assert_gone,
    create,
    make_users,
    ok,
    own_daemon,
    wait_for,
)


@pytest.fixture(scope="module")
def busy_reconciler() -> Iterator[Daemon]:
    """A daemon whose reconciler runs a pass every 0.1 s."""
    with own_daemon({"DEN_DEFAULT_IMAGE": BB, "DEN_RECONCILE_INTERVAL": "0.1"}) as d:
        yield d


def test_creates_during_reconciler_passes_survive(busy_reconciler: Daemon) -> None:
    d = busy_reconciler
    with make_users(d) as users:
        # 24 workspaces: more than a member's default quotas allow.
        owner = users.make(max_workspaces=-1, max_cpu=-1, max_memory_mb=-1, max_disk_mb=-1)
        # Existing workspaces make each pass longer: one status read each.
        with ThreadPoolExecutor(4) as pool:
            made = list(pool.map(lambda i: create(d, owner, f"r{i}"), range(24)))
        assert [w["state"] for w in made] == ["running"] * 24
        for w in made:
            assert ok(d, w["ref"], "echo alive") == "alive\n"
        assert "removing orphan" not in d.log_text()


def listed(d: Daemon, owner: str) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in d.call("workspace.list", user=owner)}


def test_failed_delete_is_listed_with_its_reason_and_retried(busy_reconciler: Daemon) -> None:
    d = busy_reconciler
    with make_users(d) as users:
        owner = users.make()
        ws = create(d, owner, "stuck")
        rootfs = d.data_dir / "pool" / "volumes" / ws["id"] / "rootfs"
        # An immutable subvolume root: btrfs refuses to delete it, as it would
        # for any host-side cause an operator has to fix.
        subprocess.run(["chattr", "+i", str(rootfs)], check=True)
        try:
            err = d.error("workspace.delete", ref=ws["ref"])
            assert err.code == -32005, err
            assert "stays listed as deleting" in err.message
            row = listed(d, owner)["stuck"]
            assert row["state"] == "deleting"
            assert "rootfs" in row["state_reason"], row
            table = d.cli("ls", "--user", owner, check=True).stdout
            assert "deleting" in table and "Operation not permitted" in table, table
            shown = d.call("workspace.get", ref=ws["ref"])
            assert shown["state"] == "deleting" and shown["state_reason"]
            # Passes keep failing while the cause stays, and keep the reason.
            wait_for(lambda: "cannot finish deleting" in d.log_text(), timeout=5)
            assert listed(d, owner)["stuck"]["state"] == "deleting"
            busy = d.error("workspace.exec", ref=ws["ref"], argv=["true"])
            assert busy.code == -32002 and "is being deleted" in busy.message
            taken = d.error("workspace.create", name="stuck", user=owner)
            assert taken.code == -32002 and "being deleted" in taken.message
        finally:
            subprocess.run(["chattr", "-i", str(rootfs)], check=False)
        assert wait_for(lambda: "stuck" not in listed(d, owner), timeout=10)
        assert_gone(d, ws["id"])
        again = create(d, owner, "stuck")
        assert ok(d, again["ref"], "echo alive") == "alive\n"
