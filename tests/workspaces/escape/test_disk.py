"""Disk limits: on by default, and no way around them from inside a workspace.

Before: no workspace had a disk limit unless the admin set ``disk_quota = true``
and the member asked for one; even then each snapshot's own qgroup was
limited, so a nested subvolume made through the btrfs ioctl (its qgroup
unlimited) took any amount; and a loop-backed pool.img kept the blocks of a
deleted workspace. Now every workspace gets ``default_disk`` on a level-1
qgroup (simple quotas) that nested subvolumes join, and the pool is trimmed
after a delete.

Each attack writes with dd from inside a real workspace and checks both that
the write failed (EDQUOT) and how much landed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.storage.conftest import debian_image_as
from tests.workspaces import conftest as wsc
from tests.workspaces.conftest import Users, create, make_users, own_daemon, wait_for

# The escape suite acts as root inside, the most a workspace has (exec's default
# is the owner's own account).
ok = partial(wsc.ok, user="root")
sh = partial(wsc.sh, user="root")

LIMIT = "128M"
MIB = 1 << 20
# What a limit lets through beyond itself: metadata and the write in flight.
SLACK_MIB = 24

# BTRFS_IOC_SUBVOL_CREATE (_IOW(0x94, 14, struct btrfs_ioctl_vol_args)) on the
# directory given: perl's ioctl reaches it with no btrfs-progs in the image.
NESTED = r"""
use Fcntl;
sysopen(my $dir, $ARGV[0], O_RDONLY | O_DIRECTORY) or die "open: $!";
my $args = pack("q a4088", 0, $ARGV[1]);
if (ioctl($dir, 0x5000940e, $args)) { print "created\n" } else { print "refused: $!\n" }
"""


def used_mib(d: Daemon, ref: str, path: str) -> float:
    """Blocks really allocated under ``path`` in the workspace, in MiB."""
    out = ok(d, ref, f"sync; du -sk {path}")
    return int(out.split()[0]) / 1024


def fill(d: Daemon, ref: str, path: str, mib: int, extra: str = "") -> dict[str, Any]:
    """Write ``mib`` MiB of random data to ``path``; returns the exec result."""
    return sh(
        d,
        ref,
        f"mkdir -p $(dirname {path}); "
        f"dd if=/dev/urandom of={path} bs=1M count={mib} {extra} 2>&1; echo rc=$?; sync",
        timeout=120,
    )


def refused(res: dict[str, Any]) -> bool:
    text = res["stdout"] + res["stderr"]
    return "Disk quota exceeded" in text or "No space left" in text


@pytest.fixture
def deb_ws(pool_daemon: Daemon, debian_image: str, users: Users) -> Iterator[tuple[Daemon, str]]:
    d = pool_daemon
    ws = create(d, users.make(), "disk", image=debian_image, disk=LIMIT)
    assert ws["disk_mb"] == 128
    yield d, ws["ref"]


def test_every_workspace_gets_the_default_limit_and_dd_stops_at_it() -> None:
    with own_daemon({"DEN_DEFAULT_DISK": LIMIT}) as d, make_users(d) as users:
        owner = users.make()
        ws = create(d, owner, "dflt")
        assert ws["disk_mb"] == 128, ws
        res = fill(d, ws["ref"], "/var/tmp/big", 300)
        assert refused(res), res
        assert used_mib(d, ws["ref"], "/var/tmp/big") <= 128 + SLACK_MIB
        # --disk still chooses another size, up to the member's quota.
        other = create(d, owner, "bigger", disk="256M")
        assert other["disk_mb"] == 256, other
        # Deleting what was written gives the room back.
        ok(d, ws["ref"], "rm /var/tmp/big; sync")
        res = fill(d, ws["ref"], "/var/tmp/again", 64)
        assert "rc=0" in res["stdout"] and not refused(res), res


def nested_escape(d: Daemon, ref: str) -> bool:
    """Try the nested-subvolume escape; False when the ioctl was refused outright."""
    ok(d, ref, "mkdir -p /var/tmp/n")
    res = sh(d, ref, f"perl -e '{NESTED}' /var/tmp/n sub")
    assert res["exit_code"] == 0, res
    if "refused" in res["stdout"]:
        return False
    assert "created" in res["stdout"], res
    res = fill(d, ref, "/var/tmp/n/sub/big", 300)
    assert refused(res), res
    assert used_mib(d, ref, "/var/tmp/n/sub") <= 128 + SLACK_MIB
    # The nested subvolume's data counts against the workspace as a whole.
    res = fill(d, ref, "/var/tmp/outside", 64)
    assert refused(res), res
    return True


def test_a_nested_subvolume_cannot_be_made(deb_ws: tuple[Daemon, str]) -> None:
    """Under the sandbox's seccomp profile the subvolume ioctl is refused; where a
    kernel or profile let it through, the writes inside must still count."""
    d, ref = deb_ws
    nested_escape(d, ref)


def test_a_nested_subvolume_counts_even_without_seccomp() -> None:
    """The limit holds on its own: with the syscall filter off, a nested subvolume
    joins the workspace's qgroup and its writes stop at the same limit."""
    with own_daemon({"DEN_SANDBOX_SECCOMP": "false"}) as d, make_users(d) as users:
        image = str(debian_image_as(d, "deb")["name"])
        ws = create(d, users.make(), "noseccomp", image=image, disk=LIMIT)
        if not nested_escape(d, ws["ref"]):
            pytest.skip("the subvolume ioctl is refused even without den's seccomp profile")


def test_hard_links_and_reflinks_give_no_room(deb_ws: tuple[Daemon, str]) -> None:
    d, ref = deb_ws
    res = fill(d, ref, "/var/tmp/a", 96)
    assert "rc=0" in res["stdout"] and not refused(res), res
    # Links and reflink copies share the blocks: they cost nothing and take nothing.
    ok(d, ref, "cd /var/tmp && for i in 1 2 3 4; do ln a h$i; cp --reflink=always a r$i; done")
    # But they do not reset the count: 96 MiB more does not fit in 128.
    res = fill(d, ref, "/var/tmp/b", 96)
    assert refused(res), res
    ok(d, ref, "rm -f /var/tmp/b")
    # Writing into a reflinked copy unshares its blocks, which then count too.
    res = fill(d, ref, "/var/tmp/r1", 96, "conv=notrunc")
    assert refused(res), res


def test_a_sparse_file_counts_only_what_is_written(deb_ws: tuple[Daemon, str]) -> None:
    d, ref = deb_ws
    ok(d, ref, "truncate -s 1T /var/tmp/sparse")
    assert ok(d, ref, "stat -c %s /var/tmp/sparse").strip() == str(1 << 40)
    res = fill(d, ref, "/var/tmp/sparse", 300, "seek=4096 conv=notrunc")
    assert refused(res), res
    assert used_mib(d, ref, "/var/tmp/sparse") <= 128 + SLACK_MIB


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_the_pool_image_shrinks_after_a_delete() -> None:
    with own_daemon({"DEN_DEFAULT_DISK": "1G"}) as d, make_users(d) as users:
        img = d.data_dir / "pool.img"
        ws = create(d, users.make(), "shrink")
        before = allocated(img)
        res = fill(d, ws["ref"], "/var/tmp/fill", 200)
        assert "rc=0" in res["stdout"], res
        grown = allocated(img)
        assert grown - before >= 180 * MIB, (before, grown)
        d.call("workspace.delete", ref=ws["ref"])
        # The cleaner frees the snapshot's extents after a commit; den trims then.
        shrunk = wait_for(lambda: allocated(img) <= grown - 160 * MIB, timeout=90, interval=1)
        assert shrunk, (before, grown, allocated(img))
