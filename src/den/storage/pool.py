"""The storage pool: images, the shared code tree and per-workspace snapshots.

Layout under the pool root::

    images/NAME          read-only root filesystems
    images/.build-*      images being built (removed when a build fails)
    code/                the shared code tree /code/<server>/<org>/<repo>
    volumes/ID/          writable snapshots (a workspace's rootfs and code)
    frozen/*             read-only snapshots den reads a workspace's files from

On btrfs every image, the code tree and every volume is a subvolume and a
snapshot is O(1). When the pool cannot be btrfs, the overlayfs driver mounts
an overlay of the image instead (still O(1) to create; a clone copies the
upper layer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from den import proc
from den.errors import BackendFailure, Conflict, NotFound
from den.storage import btrfs, mounts

log = logging.getLogger(__name__)
Driver = Literal["btrfs", "overlay"]


class Pool:
    """One storage pool; every method is safe to call again (idempotent)."""

    def __init__(self, root: Path, driver: Driver) -> None:
        self.root = root
        self.driver = driver
        self.images = root / "images"
        self.code = root / "code"
        self.volumes = root / "volumes"
        self.frozen_dir = root / "frozen"

    @classmethod
    def detect(cls, root: Path, wanted: str = "auto") -> Pool:
        """The pool at ``root`` with the driver its filesystem allows."""
        if wanted == "overlay":
            return cls(root, "overlay")
        on_btrfs = root.exists() and btrfs.is_btrfs(root) and btrfs.available()
        if wanted == "btrfs" and not on_btrfs:
            raise BackendFailure(f"{root} is not a btrfs filesystem; run `den init`")
        return cls(root, "btrfs" if on_btrfs else "overlay")

    def prepare(self) -> None:
        """Create the layout (the code tree as a subvolume on btrfs)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for d in (self.images, self.volumes, self.frozen_dir):
            d.mkdir(exist_ok=True, mode=0o700)
        for left in sorted(self.frozen_dir.iterdir()):
            log.warning("removing a leftover frozen snapshot", extra={"ctx": {"path": left}})
            self.discard(left)
        if not self.code.exists():
            if self.driver == "btrfs":
                btrfs.create_subvolume(self.code)
            else:
                self.code.mkdir()
        self.code.chmod(0o755)

    # -- images ----------------------------------------------------------------
    def image_path(self, name: str) -> Path:
        return self.images / name

    def new_build(self, name: str, tag: str) -> Path:
        """A fresh, empty directory (subvolume) to build image ``name`` in."""
        path = self.images / f".build-{name}-{tag}"
        if self.driver == "btrfs":
            btrfs.create_subvolume(path)
        else:
            path.mkdir()
        return path

    def commit_build(self, build: Path, name: str) -> Path:
        """Make a finished build the read-only image ``name``."""
        final = self.image_path(name)
        if final.exists():
            raise Conflict(f"an image named {name!r} exists already")
        build.rename(final)
        if self.driver == "btrfs":
            btrfs.set_read_only(final, True)
        return final

    def discard(self, path: Path) -> None:
        """Remove a build, an image or a volume directory with everything in it."""
        if not path.exists():
            return
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif self.driver == "btrfs" and btrfs.is_subvolume(path):
            if btrfs.is_read_only(path):
                btrfs.set_read_only(path, False)
            btrfs.delete_subvolume(path)
        else:
            shutil.rmtree(path)

    def leftover_builds(self) -> list[Path]:
        return sorted(self.images.glob(".build-*")) if self.images.exists() else []

    # -- volumes (writable snapshots) ----------------------------------------
    def volume_dir(self, vid: str) -> Path:
        return self.volumes / vid

    async def snapshot(self, src: Path, vid: str, part: str) -> Path:
        """A writable O(1) snapshot of ``src`` as ``volumes/vid/part``; returns its root."""
        if not src.exists():
            raise NotFound(f"nothing to snapshot at {src}")
        vdir = self.volume_dir(vid)
        vdir.mkdir(exist_ok=True, mode=0o711)
        dst = vdir / part
        if self.driver == "btrfs":
            if dst.exists():
                return dst
            await asyncio.to_thread(btrfs.snapshot, src, dst)
            return dst
        return await self._overlay(src, vdir, part)

    async def _overlay(self, lower: Path, vdir: Path, part: str) -> Path:
        upper, work, merged = vdir / f"{part}.upper", vdir / f"{part}.work", vdir / part
        for d in (upper, work, merged):
            d.mkdir(exist_ok=True)
        if not _is_mountpoint(merged):
            await proc.run(
                [
                    "mount",
                    "-t",
                    "overlay",
                    "overlay",
                    "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}",
                    str(merged),
                ]
            )
        return merged

    async def clone(self, src_vid: str, part: str, dst_vid: str) -> Path:
        """A writable copy of another volume's part (O(1) on btrfs)."""
        src = self.volume_dir(src_vid) / part
        if not src.exists():
            raise NotFound(f"volume {src_vid} has no {part}")
        if self.driver == "btrfs":
            return await self.snapshot(src, dst_vid, part)
        vdir = self.volume_dir(dst_vid)
        vdir.mkdir(exist_ok=True, mode=0o711)
        await proc.run(["cp", "-a", "--reflink=auto", str(src), str(vdir / f"{part}.base")])
        return await self._overlay(vdir / f"{part}.base", vdir, part)

    async def delete_volume(self, vid: str) -> None:
        """Remove a volume with all its parts; missing is fine."""
        vdir = self.volume_dir(vid)
        if not vdir.exists():
            return
        for mp in mounts.mounts_under(vdir):
            await proc.run(["umount", "--lazy", mp])
        for child in sorted(vdir.iterdir()):
            try:
                await asyncio.to_thread(self.discard, child)
            except BackendFailure:
                if not await self._lift_limit(child):
                    raise
                # A subvolume at its disk limit cannot even delete what it holds
                # (EDQUOT): a workspace could make itself undeletable.
                await asyncio.to_thread(self.discard, child)
        vdir.rmdir()

    async def _lift_limit(self, subvol: Path) -> bool:
        """Lift a disk limit on ``subvol``; False when there was none to lift."""
        if self.driver != "btrfs" or not btrfs.is_subvolume(subvol):
            return False
        try:
            await btrfs.qgroup_limit_exclusive(self.root, subvol, None)
        except BackendFailure:
            return False
        return True

    @contextlib.asynccontextmanager
    async def frozen(self, src: Path) -> AsyncIterator[Path]:
        """A read-only O(1) snapshot of the subvolume ``src``, removed on exit.

        A workspace can change its own files at any instant; what den reads
        or runs git on must hold still, so den reads this copy instead. Only
        btrfs can make one (workspaces need btrfs anyway).
        """
        if self.driver != "btrfs":
            raise Conflict("reading a workspace's files needs a btrfs pool; run `den init`")
        dst = self.frozen_dir / secrets.token_hex(8)
        await asyncio.to_thread(btrfs.snapshot, src, dst, read_only=True)
        try:
            yield dst
        finally:
            await asyncio.to_thread(self.discard, dst)

    def volume_ids(self) -> list[str]:
        return sorted(p.name for p in self.volumes.iterdir()) if self.volumes.exists() else []

    def usage(self) -> dict[str, int]:
        du = shutil.disk_usage(self.root)
        return {"total": du.total, "used": du.used, "free": du.free}


def _is_mountpoint(path: Path) -> bool:
    return mounts.is_mountpoint(path)
