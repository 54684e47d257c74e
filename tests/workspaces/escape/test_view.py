"""A workspace's view of the system: its own network devices and mounts only.

Before: /sys was a read-only bind of the host's sysfs, so /sys/class/net listed
every tenant's veth (named after workspace ids) with traffic counters, and
/proc/self/mountinfo named host paths (the data directory, the bundles, the
views). Now each workspace gets a sysfs of its own network namespace and its
mounts come from places that say nothing about the host.
"""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon
from tests.workspaces.conftest import create, make_users, ok, veth


@pytest.fixture(scope="module")
def two(pool_daemon: Daemon, bb_image: str) -> Iterator[tuple[Daemon, dict[str, str]]]:
    d = pool_daemon
    with make_users(d) as u:
        a, b = u.make(), u.make()
        wa = create(d, a, "viewa", image=bb_image)
        wb = create(d, b, "viewb", image=bb_image)
        yield d, {"a": wa["ref"], "a_id": wa["id"], "b": wb["ref"], "b_id": wb["id"]}


def test_sys_class_net_lists_only_own_devices(two: tuple[Daemon, dict[str, str]]) -> None:
    d, w = two
    names = set(ok(d, w["a"], "ls /sys/class/net").split())
    assert names == {"lo", "eth0"}, names
    # Neither the host's bridge nor the other tenant's veth is visible, nor
    # their counters anywhere under /sys/devices.
    other = veth(d, w["b_id"])
    found = ok(d, w["a"], f"find /sys/devices -maxdepth 4 -name '{other}' 2>/dev/null; true")
    assert found.strip() == "", found
    bridge = f"den{d.instance}"
    found = ok(d, w["a"], f"ls -d /sys/devices/virtual/net/{bridge} 2>/dev/null; true")
    assert found.strip() == ""


def test_own_counters_are_visible(two: tuple[Daemon, dict[str, str]]) -> None:
    d, w = two
    rx = int(ok(d, w["a"], "cat /sys/class/net/eth0/statistics/rx_bytes").strip())
    assert rx >= 0
    mtu = ok(d, w["a"], "cat /sys/class/net/lo/mtu").strip()
    assert mtu == "65536"


def test_sys_is_read_only(two: tuple[Daemon, dict[str, str]]) -> None:
    d, w = two
    res = d.call("workspace.exec", ref=w["a"], argv=["sh", "-c", "echo 1 > /sys/class/net/lo/mtu"])
    assert res["exit_code"] != 0
    assert "Read-only" in res["stderr"] or "denied" in res["stderr"], res


def test_mountinfo_names_no_host_path(two: tuple[Daemon, dict[str, str]]) -> None:
    d, w = two
    info = ok(d, w["a"], "cat /proc/self/mountinfo")
    data = str(d.data_dir)
    assert data not in info, info
    for word in ("bundles", "views", "/run/den", "tini", w["b_id"]):
        assert word not in info, (word, info)
    # Every mount's root (field 4) is its path inside its own filesystem:
    # the workspace's own volume, or one name in a filesystem of its own
    # (/init, /hosts on den's tmpfs; /null, /sys on proc and /dev).
    for line in info.splitlines():
        root = line.split()[3]
        assert root.count("/") == 1 or root.startswith(f"/volumes/{w['a_id']}/"), line


def test_host_users_cannot_enter_the_views(two: tuple[Daemon, dict[str, str]]) -> None:
    """Another host account cannot read the workspace's files or run its setuid
    programs through the idmapped views (only the workspace's root uid may enter)."""
    d, w = two
    vdir = d.data_dir / "pool" / "views" / w["a_id"]
    assert (vdir / "root" / "bin").exists()
    res = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", str(vdir / "root")],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "Permission denied" in res.stderr, res
    assert stat.S_IMODE(vdir.stat().st_mode) == 0o700


def test_other_tenants_disk_groups_are_hidden(two: tuple[Daemon, dict[str, str]]) -> None:
    """The pool's qgroups in sysfs are named after workspace ids, with their usage."""
    d, w = two
    host = list(Path("/sys/fs/btrfs").glob("*/qgroups"))
    assert host, "the host has btrfs quota groups in sysfs"
    found = ok(
        d,
        w["a"],
        "ls -A /sys/fs/btrfs 2>/dev/null; ls -A /sys/devices/virtual/powercap 2>/dev/null; true",
    )
    assert found.strip() == "", found
