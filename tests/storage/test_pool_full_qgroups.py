"""Disk limits on kernels without btrfs simple quotas (before 6.7): full qgroups.

This kernel has simple quotas, so the pool here is made with the full ones on
purpose (`btrfs quota enable`, what `den init` falls back to where the kernel
refuses simple quotas), on a loop device the test makes and removes.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from den.storage import btrfs
from den.storage.pool import Pool


@pytest.fixture
def full_pool(tmp_path: Path) -> Iterator[Pool]:
    image, mnt = tmp_path / "pool.img", tmp_path / "pool"
    subprocess.run(["truncate", "-s", "2G", str(image)], check=True)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        subprocess.run(["btrfs", "quota", "enable", str(mnt)], check=True)
        pool = Pool.detect(mnt, "btrfs")
        pool.prepare()
        yield pool
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=False)


def _dd(target: Path, mib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dd", "if=/dev/urandom", f"of={target}", "bs=1M", f"count={mib}", "status=none"],
        capture_output=True,
        text=True,
    )


def test_full_qgroups_limit_each_part_and_not_the_shared_image(full_pool: Pool) -> None:
    pool = full_pool
    assert btrfs.quota_mode(pool.root) == "qgroup"
    assert pool.quotas() and not pool.simple_quotas()
    image = pool.image_path("img")
    btrfs.create_subvolume(image)
    assert _dd(image / "base", 150).returncode == 0

    async def scenario() -> None:
        root = await pool.snapshot(image, "abcdef123456", "rootfs")
        await pool.limit_volume("abcdef123456", 100 << 20)
        # The 150 MiB the snapshot shares with the image do not count: 80 fit.
        assert _dd(root / "fits", 80).returncode == 0
        res = _dd(root / "past", 100)
        assert res.returncode != 0 and "quota exceeded" in res.stderr, res
        # Lifting the limit lets the owner delete a volume at its limit.
        await pool.delete_volume("abcdef123456")
        assert not pool.volume_dir("abcdef123456").exists()

    asyncio.run(scenario())
