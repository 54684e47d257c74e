"""The overlayfs fallback of the storage pool, for hosts where it cannot be btrfs."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from den.errors import BackendFailure
from den.storage import idmap, mounts
from den.storage.pool import Pool


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    p = Pool(tmp_path / "pool", "overlay")
    p.prepare()
    try:
        yield p
    finally:
        for mp in mounts.mounts_under(tmp_path):
            subprocess.run(["umount", "--lazy", mp], check=False)


def test_a_snapshot_is_a_writable_overlay_and_the_image_stays(pool: Pool) -> None:
    image = pool.image_path("img")
    (image / "etc").mkdir(parents=True)
    (image / "etc" / "os").write_text("debian\n")
    root = asyncio.run(pool.snapshot(image, "v1", "rootfs"))
    assert mounts.is_mountpoint(root)
    assert (root / "etc" / "os").read_text() == "debian\n"
    (root / "etc" / "os").write_text("changed\n")
    (root / "new").write_text("x")
    assert (image / "etc" / "os").read_text() == "debian\n"
    assert not (image / "new").exists()

    copy = asyncio.run(pool.clone("v1", "rootfs", "v2"))
    assert (copy / "etc" / "os").read_text() == "changed\n"
    (copy / "new").write_text("y")
    assert (root / "new").read_text() == "x"

    for vid in ("v1", "v2"):
        asyncio.run(pool.delete_volume(vid))
    assert pool.volume_ids() == []
    assert not mounts.mounts_under(pool.root)
    assert (image / "etc" / "os").read_text() == "debian\n"


def test_workspaces_on_overlay_are_refused_with_a_clear_error(pool: Pool, tmp_path: Path) -> None:
    image = pool.image_path("img")
    image.mkdir(parents=True)
    root = asyncio.run(pool.snapshot(image, "v1", "rootfs"))
    view = tmp_path / "view"
    view.mkdir()
    with pytest.raises(BackendFailure) as info:
        idmap.idmapped_bind(root, view, idmap.shifted(100000, 65536))
    assert "btrfs" in info.value.message
    assert not mounts.is_mountpoint(view)
    asyncio.run(pool.delete_volume("v1"))
