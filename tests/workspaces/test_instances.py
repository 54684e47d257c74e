"""Two den instances on one host never touch each other's workspaces or network."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.workspaces.conftest import BB, own_daemon


def nft_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@pytest.mark.slow
def test_two_instances_stay_apart() -> None:
    env = {"DEN_DEFAULT_IMAGE": BB, "DEN_RECONCILE_INTERVAL": "0"}
    with own_daemon(env) as a, own_daemon(env) as b:
        assert a.instance != b.instance
        for d in (a, b):
            d.call("user.create", name="owner")
        wa = a.call("workspace.create", name="w", user="owner")
        wb = b.call("workspace.create", name="w", user="owner")
        # separate subnets, bridges, tables, crun roots and cgroups
        assert wa["address"].split(".")[1] != wb["address"].split(".")[1]
        for d in (a, b):
            assert link_exists(f"den{d.instance}")
            assert f"inet den{d.instance}" in nft_tables()
        assert Path(f"/run/den/crun{a.instance}/den{a.instance}-{wa['id']}").exists()
        assert not Path(f"/run/den/crun{a.instance}/den{a.instance}-{wb['id']}").exists()

        # a restart of A (its reconciler removes what A has no record of) spares B
        a.restart()
        assert b.call("workspace.exec", ref="owner/w", argv=["echo", "b"])["stdout"] == "b\n"

        # deleting all of A's workspaces undoes A's host changes only
        a.call("workspace.delete", ref="owner/w")
        assert not link_exists(f"den{a.instance}")
        assert f"inet den{a.instance}" not in nft_tables()
        assert link_exists(f"den{b.instance}")
        assert f"inet den{b.instance}" in nft_tables()
        assert (
            b.call("workspace.exec", ref="owner/w", argv=["echo", "still"])["stdout"] == "still\n"
        )
        with open("/proc/sys/net/ipv4/ip_forward") as f:
            assert f.read().strip() == "1"  # B still needs forwarding for its egress
        b.call("workspace.delete", ref="owner/w")
        assert not link_exists(f"den{b.instance}")
