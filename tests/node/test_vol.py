"""vol.*: the node's storage through den's registry, on loop devices the tests make.

One daemon with a small loopback pool for the module (its pool is one of the
protected objects); every loop device, mount and MD array a test makes is
removed after it, even when it fails. Calls are root's over the unix socket
(an admin: the node ACL lets admins through).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from den.node import vol_sys
from tests.conftest import Daemon, running_daemon

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("sgdisk", "mdadm", "mkfs.vfat", "mkfs.btrfs")),
    reason="gdisk, mdadm, dosfstools and btrfs-progs are needed (scripts/install-deps)",
)

MiB = 1 << 20


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def blkid_type(dev: str) -> str:
    return run("blkid", "-p", "-o", "value", "-s", "TYPE", dev).stdout.strip()


def audit(d: Daemon, method: str) -> list[dict[str, Any]]:
    c = d.client()
    try:
        events: list[dict[str, Any]] = c.call("audit.list", {"method": method, "limit": 20})
        return events
    finally:
        c.close()


def code(d: Daemon, method: str, **params: Any) -> int:
    err = d.error(method, **params)
    return err.code


@pytest.fixture(scope="module")
def vd() -> Iterator[Daemon]:
    # No microVM backend: vol.* needs none, and its assets take minutes to build.
    with running_daemon({"DEN_MICROVM": "false"}, pool="1G") as d:
        yield d


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory of the test's own below /mnt (an allowed root); whatever is
    mounted below it is unmounted after."""
    base = Path(tempfile.mkdtemp(prefix="den-vol-", dir="/mnt"))
    try:
        yield base
    finally:
        for mp in sorted((m for m in mount_points() if m.startswith(f"{base}/")), reverse=True):
            run("umount", "--lazy", mp)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def loops() -> Iterator[Callable[[int], str]]:
    """Make loop devices (partition scanning on) of N MiB; all detached after, their
    mounts and MD arrays gone first."""
    made: list[tuple[str, Path]] = []
    tmp = Path(tempfile.mkdtemp(prefix="den-vol-img-"))

    def make(mib: int) -> str:
        img = tmp / f"{len(made)}.img"
        with img.open("wb") as f:
            f.truncate(mib * MiB)
        dev = run("losetup", "-fP", "--show", str(img)).stdout.strip()
        assert dev.startswith("/dev/loop"), dev
        made.append((dev, img))
        return dev

    try:
        yield make
    finally:
        names = {os.path.basename(dev) for dev, _ in made}
        for md in Path("/sys/block").glob("md*"):
            if {p.name for p in (md / "slaves").iterdir()} & names:
                run("mdadm", "--stop", f"/dev/{md.name}")
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if any(fields[-2].startswith(dev) for dev, _ in made):
                    run("umount", "--lazy", fields[4])
        for dev, _ in made:
            run("mdadm", "--zero-superblock", dev)
            run("losetup", "-d", dev)
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_partition_format_mount_snapshot_quota_scrub_unmount(
    vd: Daemon, loops: Callable[[int], str], root: Path
) -> None:
    disk = loops(400)
    gaps = vd.call("vol.list_free_space", device=disk)
    assert len(gaps) == 1 and gaps[0]["size_bytes"] > 390 * MiB
    part = vd.call("vol.create_partition", device=disk, size_bytes=300 * MiB, label="data")
    assert part["partition"] == f"{disk}p1" and part["size_bytes"] == 300 * MiB
    assert Path(part["partition"]).exists()
    # A disk with a table: only with force (then added to the GPT).
    assert code(vd, "vol.create_partition", device=disk, size_bytes=50 * MiB) == -32002
    second = vd.call("vol.create_partition", device=disk, size_bytes=50 * MiB, force=True)
    assert second["number"] == 2

    dev = part["partition"]
    fs = vd.call("vol.create_filesystem", device=dev, fstype="btrfs", label="den-vol")
    assert fs["uuid"] and blkid_type(dev) == "btrfs"
    assert code(vd, "vol.create_filesystem", device=dev, fstype="ext4") == -32002  # holds btrfs
    parts = {p["path"]: p for p in vd.call("vol.list_partitions")}
    assert parts[dev]["fstype"] == "btrfs" and parts[dev]["part_label"] == "data"
    assert any(f["device"] == dev for f in vd.call("vol.list_filesystems"))

    mp = str(root / "data")
    got = vd.call("vol.mount", device=dev, mount_point=mp, options=["noatime"])
    assert got["fstype"] == "btrfs" and {"nosuid", "nodev"} <= set(got["options"])
    mine = [m for m in vd.call("vol.list_mounts") if m["mount_point"] == mp]
    assert mine and mine[0]["managed"] and "nosuid" in mine[0]["options"]
    # Mounted: not even force overwrites it.
    err = vd.error("vol.create_filesystem", device=dev, fstype="btrfs", force=True)
    assert err.code == -32002 and "mounted at" in err.message
    assert code(vd, "vol.create_partition", device=disk, force=True) == -32002

    sub = f"{mp}/work"
    assert vd.call("vol.create_subvolume", path=sub)["id"] >= 256
    Path(sub, "f").write_bytes(b"x" * 4096)
    snap = vd.call("vol.snapshot_subvolume", source=sub, dest=f"{mp}/snap", read_only=True)
    assert Path(snap["path"], "f").read_bytes() == b"x" * 4096
    subs = {s["path"]: s for s in vd.call("vol.list_subvolumes", path=mp)}
    assert not subs["work"]["read_only"] and subs["snap"]["read_only"]
    assert subs["snap"]["parent_uuid"] == subs["work"]["uuid"]

    vd.call("vol.defrag", path=sub, recursive=True)
    q = vd.call("vol.set_quota", path=sub, limit_bytes=32 * MiB)
    assert q["qgroup"] == f"0/{subs['work']['id']}"
    dd = run("dd", "if=/dev/urandom", f"of={sub}/big", "bs=1M", "count=80", "conv=fsync")
    assert dd.returncode != 0 and "quota" in dd.stderr.lower()

    vd.call("vol.scrub_start", path=mp)
    done = wait_for(
        lambda: (s := vd.call("vol.scrub_status", path=mp))["status"] != "running" and s
    )
    assert done["status"] == "finished"
    assert any(g["type"] == "Data" for g in vd.call("vol.fs_df", path=mp))
    assert vd.call("vol.fs_usage", path=mp)["device_size"] > 0
    assert all(v == 0 for c in vd.call("vol.device_stats", path=mp).values() for v in c.values())
    assert vd.call("vol.balance_status", path=mp)["running"] is False
    assert vd.call("vol.verify")["ok"]

    vd.call("vol.delete_subvolume", path=f"{mp}/snap")
    assert not Path(mp, "snap").exists()
    vd.call("vol.unmount", mount_point=mp)
    assert mp not in mount_points()
    assert all(e["mount_point"] != mp for e in vd.call("vol.verify")["entries"])
    events = audit(vd, "vol.create_filesystem")
    assert any(e["target"] == f"device:{dev} fstype:btrfs" for e in events)


def test_ext4_vfat_swap(vd: Daemon, loops: Callable[[int], str]) -> None:
    def seen() -> str:
        found: dict[str, dict[str, str]] = vd.call("vol.inventory")["filesystems"]
        return found.get(dev, {}).get("TYPE", "")

    dev = loops(64)
    assert seen() == ""
    for fstype, want in (("ext4", "ext4"), ("vfat", "vfat"), ("swap", "swap")):
        got = vd.call("vol.create_filesystem", device=dev, fstype=fstype, label="d", force=True)
        assert got["fstype"] == fstype and blkid_type(dev) == want
        assert seen() == want  # the reads' remembered probes never lag a change
    # Changed behind den's back: seen as soon as it is done.
    assert run("wipefs", "-a", "-q", dev).returncode == 0
    assert seen() == ""
    assert run("mkfs.ext4", "-q", dev).returncode == 0
    assert seen() == "ext4"


NO_MD = vol_sys.md_missing()  # what this kernel lacks for MD RAID, "" when nothing


@pytest.mark.skipif(not NO_MD, reason="this kernel has MD RAID: test_md_raid1 runs")
def test_md_refused_without_kernel_support(vd: Daemon, loops: Callable[[int], str]) -> None:
    a, b = loops(64), loops(64)
    err = vd.error("vol.create_md_array", name="denvt", devices=[a, b])
    assert err.code == -32005 and "CONFIG_MD" in err.message
    assert not Path("/dev/md/denvt").exists() and blkid_type(a) == blkid_type(b) == ""


@pytest.mark.skipif(bool(NO_MD), reason=NO_MD)
@pytest.mark.slow
def test_md_raid1(vd: Daemon, loops: Callable[[int], str]) -> None:
    a, b = loops(64), loops(64)
    md = vd.call("vol.create_md_array", name="denvt", devices=[a, b])
    name = os.path.basename(md["path"])
    arrays = {x["name"]: x for x in vd.call("vol.list_md_arrays")}
    assert arrays[name]["level"] == "raid1" and arrays[name]["raid_disks"] == 2
    assert {m["path"] for m in arrays[name]["members"]} == {a, b}
    assert vd.call("vol.md_detail", device=md["path"])["detail"]["MD_LEVEL"] == "raid1"
    err = vd.error("vol.create_filesystem", device=a, fstype="ext4", force=True)
    assert err.code == -32002 and name in err.message  # a member of the array
    vd.call("vol.create_filesystem", device=md["path"], fstype="ext4")
    vd.call("vol.stop_md_array", device=md["path"], zero_superblock=True)
    assert not Path(f"/sys/block/{name}/md").exists()
    assert blkid_type(a) == "" and blkid_type(b) == ""


@pytest.mark.slow
def test_btrfs_raid1(vd: Daemon, loops: Callable[[int], str], root: Path) -> None:
    a, b = loops(300), loops(300)
    got = vd.call("vol.create_btrfs_raid", devices=[a, b], label="r1")
    assert got["uuid"] and got["data_profile"] == "raid1"
    mp = str(root / "r1")
    vd.call("vol.mount", device=b, mount_point=mp)
    df = {g["type"]: g["profile"] for g in vd.call("vol.fs_df", path=mp)}
    assert df["Data"] == "RAID1" and df["Metadata"] == "RAID1"
    assert set(vd.call("vol.device_stats", path=mp)) == {a, b}
    # Either member is the mounted filesystem now.
    assert code(vd, "vol.create_filesystem", device=a, fstype="ext4", force=True) == -32002
    vd.call("vol.unmount", mount_point=mp)


def test_recorded_mount_restored_and_vanished_pruned(
    vd: Daemon, loops: Callable[[int], str], root: Path
) -> None:
    d = vd  # restarted below: the module's daemon
    keep, gone = loops(128), loops(128)
    for dev in (keep, gone):
        d.call("vol.create_filesystem", device=dev, fstype="ext4")
    mp_keep, mp_gone = str(root / "keep"), str(root / "gone")
    d.call("vol.mount", device=keep, mount_point=mp_keep)
    d.call("vol.mount", device=gone, mount_point=mp_gone)
    Path(mp_keep, "hello").write_text("kept")
    d.stop()
    # As after a reboot: nothing mounted; one device is gone for good.
    for mp in (mp_keep, mp_gone):
        assert run("umount", mp).returncode == 0
    assert run("losetup", "-d", gone).returncode == 0
    d.start()
    assert mp_keep in mount_points() and Path(mp_keep, "hello").read_text() == "kept"
    assert mp_gone not in mount_points()
    assert [e["mount_point"] for e in d.call("vol.verify")["entries"]] == [mp_keep]
    pruned = audit(d, "vol.prune")
    assert pruned and pruned[0]["target"] == f"mount:{gone} -> {mp_gone}"
    # Drift: unmounted behind den's back.
    assert run("umount", mp_keep).returncode == 0
    drift = d.call("vol.verify")
    assert not drift["ok"] and drift["drift"][0]["state"] == "not_mounted"
    d.call("vol.unmount", mount_point=mp_keep)  # forgets the record


def _pool_device(d: Daemon) -> str:
    img = str(d.data_dir / "pool.img")
    out = run("losetup", "-j", img).stdout
    return out.split(":")[0]


def test_protected_objects_refused(vd: Daemon, loops: Callable[[int], str], root: Path) -> None:
    pool_dev, pool_dir = _pool_device(vd), str(vd.data_dir / "pool")
    assert pool_dev.startswith("/dev/loop")
    root_dev = next(m["source"] for m in vd.call("vol.list_mounts") if m["mount_point"] == "/")
    before = blkid_type(pool_dev)
    for dev in (pool_dev, root_dev):
        for method, extra in (
            ("vol.create_filesystem", {"fstype": "ext4", "force": True}),
            ("vol.create_partition", {"force": True}),
            ("vol.mount", {"mount_point": str(root / "x")}),
        ):
            if not Path(dev).exists():
                continue  # a root device this host does not show in /dev
            err = vd.error(method, device=dev, **extra)
            assert err.code == -32003 and dev in err.message and "protected" in err.message
    for method in ("vol.create_md_array", "vol.create_btrfs_raid"):
        spare = loops(64)
        err = vd.error(method, name="x", devices=[spare, pool_dev], force=True) if "md" in method \
            else vd.error(method, devices=[spare, pool_dev], force=True)  # fmt: skip
        assert err.code == -32003 and pool_dev in err.message
        assert blkid_type(spare) == ""  # nothing written to the other member either
    assert blkid_type(pool_dev) == before == "btrfs"
    inv = vd.call("vol.inventory")
    assert "pool" in inv["protected"][os.path.basename(pool_dev)]

    for mp in ("/", pool_dir):
        err = vd.error("vol.unmount", mount_point=mp)
        assert err.code == -32003 and "protected" in err.message
    # A mount den did not make: refused by unmount, and not a place den changes.
    foreign = root / "foreign"
    foreign.mkdir()
    assert run("mount", "-t", "tmpfs", "tmpfs", str(foreign)).returncode == 0
    err = vd.error("vol.unmount", mount_point=str(foreign))
    assert (
        err.code == -32003 and str(foreign) in err.message and "not mounted by den" in err.message
    )
    assert str(foreign) in mount_points()
    for method, params in (
        ("vol.create_subvolume", {"path": f"{pool_dir}/sneaky"}),
        ("vol.scrub_start", {"path": pool_dir}),
        ("vol.set_quota", {"path": f"{pool_dir}/code", "limit_bytes": MiB << 4}),
        ("vol.resize_max", {"path": "/"}),
    ):
        assert code(vd, method, **params) == -32003, method
    assert not Path(pool_dir, "sneaky").exists()


def test_hostile_params(vd: Daemon, loops: Callable[[int], str], root: Path) -> None:
    dev = loops(64)
    before = mount_points()
    bad: list[tuple[str, dict[str, Any]]] = [
        ("vol.create_filesystem", {"device": "/etc/passwd", "fstype": "ext4"}),
        ("vol.create_filesystem", {"device": "/dev/../etc/passwd", "fstype": "ext4"}),
        ("vol.create_filesystem", {"device": "loop0", "fstype": "ext4"}),
        ("vol.create_filesystem", {"device": "/dev/null", "fstype": "ext4"}),
        ("vol.create_filesystem", {"device": dev, "fstype": "xfs"}),
        ("vol.create_filesystem", {"device": dev, "fstype": "ext4", "label": "a b;rm"}),
        ("vol.create_filesystem", {"device": dev, "fstype": "vfat", "label": "x" * 12}),
        ("vol.create_partition", {"device": dev, "size_bytes": 1 << 62}),
        ("vol.create_partition", {"device": dev, "size_bytes": 1 << 40}),
        ("vol.create_partition", {"device": dev, "size_bytes": -1}),
        ("vol.mount", {"device": dev, "mount_point": f"{root}/../../etc"}),
        ("vol.mount", {"device": dev, "mount_point": "/etc/den-x"}),
        ("vol.mount", {"device": dev, "mount_point": "/mnt"}),
        ("vol.mount", {"device": dev, "mount_point": "relative/x"}),
        ("vol.mount", {"device": dev, "mount_point": f"{root}//x"}),
        ("vol.mount", {"device": dev, "mount_point": f"{root}/x", "options": ["suid"]}),
        ("vol.mount", {"device": dev, "mount_point": f"{root}/x", "options": ["ro,dev"]}),
        ("vol.mount", {"device": "/dev/shm/../loop0", "mount_point": f"{root}/x"}),
        ("vol.unmount", {"mount_point": "/mnt/../"}),
        ("vol.create_md_array", {"name": "../x", "devices": [dev, dev]}),
        ("vol.create_md_array", {"name": "ok", "devices": [dev]}),
        ("vol.list_free_space", {"device": "/sys/block/loop0"}),
        ("vol.list_subvolumes", {"path": "/nonexistent/x"}),
    ]
    link = root / "escape"
    link.symlink_to("/etc")
    bad.append(("vol.mount", {"device": dev, "mount_point": f"{link}/x"}))
    for method, params in bad:
        with pytest.raises(RpcError) as info:
            vd.call(method, **params)
        assert info.value.code == -32602, (method, params, info.value.message)
    assert blkid_type(dev) == ""
    assert mount_points() == before
    assert not Path("/etc/den-x").exists() and not Path("/etc/x").exists()
    assert vd.call("vol.verify")["entries"] == []


def test_reads(vd: Daemon) -> None:
    disks = {d["name"]: d for d in vd.call("vol.list_disks")}
    pool = os.path.basename(_pool_device(vd))
    assert disks[pool]["backing_file"] == str(vd.data_dir / "pool.img") and disks[pool]["protected"]
    inv = vd.call("vol.inventory")
    assert {"disks", "filesystems", "md_arrays", "btrfs", "protected", "pool"} <= set(inv)
    assert any(m["mount_point"] == "/" for m in vd.call("vol.list_mounts"))
    assert any(s["path"] == "code" for s in vd.call("vol.list_subvolumes"))
    usage = vd.call("vol.usage", path=str(vd.data_dir / "pool"))[0]
    assert usage["total_bytes"] > usage["available_bytes"] > 0
    with contextlib.suppress(RpcError):
        vd.call("vol.scrub_status")  # the pool's, never scrubbed: either answer is fine
