"""What `den init` does: packages, the cgroup fix, the loopback btrfs pool."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from den import proc
from den.config import Settings
from den.errors import BackendFailure
from den.host.checks import CGROUP_ROOT, Check, fstab_has, hugetlb_missing
from den.storage import btrfs
from den.storage.pool import Pool

Say = Callable[[str], None]


async def install_packages(packages: list[str], say: Say) -> None:
    if not packages:
        return
    say(f"installing Debian packages: {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    await proc.run(["apt-get", "update", "-q"], env=env, timeout=900)
    await proc.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
        env=env,
        timeout=1800,
    )


async def mount_hugetlb(say: Say) -> None:
    if not hugetlb_missing():
        return
    target = CGROUP_ROOT / "hugetlb"
    say(f"mounting the hugetlb cgroup controller at {target} (crun needs it on this hybrid host)")
    target.mkdir(exist_ok=True)
    await proc.run(["mount", "-t", "cgroup", "-o", "hugetlb", "cgroup", str(target)])


async def _fs_type_of(image: Path) -> str:
    res = await proc.run(["blkid", "-o", "value", "-s", "TYPE", str(image)], check=False)
    return res.stdout.strip()


async def setup_pool(settings: Settings, say: Say) -> Pool:
    """Make the pool directory a mounted btrfs filesystem (a loopback image if needed)."""
    pool_dir, image = settings.pool_dir, settings.pool_image
    pool_dir.mkdir(parents=True, exist_ok=True)
    if settings.storage_driver == "overlay":
        say(f"storage pool {pool_dir}: overlayfs driver (by configuration)")
    elif btrfs.is_btrfs(pool_dir):
        say(f"storage pool {pool_dir}: already on btrfs")
    else:
        if not image.exists():
            say(f"creating a sparse {settings.pool_size} pool image {image}")
            await proc.run(["truncate", "-s", settings.pool_size, str(image)])
            try:
                await proc.run(["mkfs.btrfs", "-q", str(image)])
            except BackendFailure:
                image.unlink(missing_ok=True)
                raise
        elif await _fs_type_of(image) != "btrfs":
            raise BackendFailure(
                f"{image} exists but holds no btrfs filesystem; move it away and run `den init` again"
            )
        say(f"mounting {image} at {pool_dir}")
        # discard=async: space freed in the pool goes back to the host as holes in
        # the image file (den also trims the pool after deleting a workspace).
        await proc.run(
            ["mount", "-t", "btrfs", "-o", "loop,discard=async", str(image), str(pool_dir)]
        )
        if settings.fstab and not fstab_has(settings):
            say(f"recording the pool mount in {settings.fstab}")
            with settings.fstab.open("a") as f:
                f.write(f"{image} {pool_dir} btrfs loop,discard=async,nofail 0 0\n")
    pool = Pool.detect(pool_dir, settings.storage_driver)
    pool.prepare()
    if settings.disk_quota and pool.driver == "btrfs":
        say("enabling btrfs quotas on the pool (per-workspace disk limits)")
        if btrfs.quota_enable(pool_dir) == "qgroup":
            say(
                f"this kernel ({os.uname().release}) has no btrfs simple quotas (Linux 6.7+): "
                "using full qgroups, which make deleting workspaces slower"
            )
    return pool


async def apply(settings: Settings, checks: list[Check], say: Say) -> None:
    """Fix what the checks found missing, in order."""
    packages = sorted({c.package for c in checks if not c.ok and c.package})
    await install_packages(packages, say)
    await mount_hugetlb(say)
    await setup_pool(settings, say)


async def teardown_pool(settings: Settings) -> None:
    """Unmount a loopback pool and forget its fstab line (tests and uninstall)."""
    pool_dir = settings.pool_dir
    if pool_dir.is_mount():
        await proc.run(["umount", str(pool_dir)])
    if settings.fstab.exists():
        lines = settings.fstab.read_text().splitlines(keepends=True)
        keep = [ln for ln in lines if not (len(ln.split()) >= 2 and ln.split()[1] == str(pool_dir))]
        if keep != lines:
            settings.fstab.write_text("".join(keep))
    if shutil.which("losetup"):
        res = await proc.run(["losetup", "-j", str(settings.pool_image)], check=False)
        for line in res.stdout.splitlines():
            await proc.run(["losetup", "-d", line.split(":")[0]], check=False)
