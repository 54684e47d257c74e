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

With simple quotas on (``disk_quota``), the snapshots of volume ID join the
level-1 qgroup of ID, which carries its disk limit (see den.storage.btrfs).
After a volume is deleted the pool trims its free space, so that a loop-backed
pool gives the space back to the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from den import proc, tasks
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
        # qgroups of deleted volumes, removed (and the pool trimmed) by one task at a time
        self._reclaim: set[int] = set()
        self._dirty = False
        self._reclaiming: asyncio.Task[None] | None = None

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
            if self.simple_quotas():
                group = btrfs.workspace_qgroup(vid)
                await asyncio.to_thread(btrfs.qgroup_create, self.root, group)
                await asyncio.to_thread(btrfs.snapshot_into, src, dst, group)
            else:
                await asyncio.to_thread(btrfs.snapshot, src, dst)
            return dst
        return await self._overlay(src, vdir, part)

    def quotas(self) -> bool:
        """Whether this pool can limit the disk of volumes (btrfs with quotas on:
        simple ones, or full qgroups on kernels before 6.7)."""
        return self.driver == "btrfs" and btrfs.quota_mode(self.root) != ""

    def simple_quotas(self) -> bool:
        return self.driver == "btrfs" and btrfs.quota_mode(self.root) == "squota"

    async def limit_volume(self, vid: str, limit_bytes: int | None) -> None:
        """Limit what volume ``vid``'s snapshots (and subvolumes made inside them) hold.

        Also puts the parts in the volume's group when they are not yet (a volume
        made before quotas were on), so the limit never misses one.
        """
        vdir = self.volume_dir(vid)
        if not self.simple_quotas():
            # Full qgroups (kernels before 6.7): putting a subvolume in a group
            # leaves the accounting inconsistent, unenforced until a rescan of the
            # whole pool. Each part's own group gets the limit instead.
            for part in sorted(vdir.iterdir()) if vdir.exists() else []:
                if btrfs.is_subvolume(part):
                    sid = await asyncio.to_thread(btrfs.subvolume_id, part)
                    await asyncio.to_thread(btrfs.qgroup_limit, self.root, sid, limit_bytes)
            return
        group = btrfs.workspace_qgroup(vid)
        await asyncio.to_thread(btrfs.qgroup_create, self.root, group)
        for part in sorted(vdir.iterdir()) if vdir.exists() else []:
            if btrfs.is_subvolume(part):
                await asyncio.to_thread(btrfs.qgroup_assign, self.root, part, group)
        await asyncio.to_thread(btrfs.qgroup_limit, self.root, group, limit_bytes)

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
        quotas = self.quotas()
        for child in sorted(vdir.iterdir()):
            try:
                await asyncio.to_thread(self.discard, child)
            except BackendFailure:
                if not quotas:
                    raise
                # A subvolume at its disk limit cannot even delete what it holds
                # (EDQUOT): a workspace could make itself undeletable.
                await self.limit_volume(vid, None)
                await asyncio.to_thread(self.discard, child)
        vdir.rmdir()
        if self.driver == "btrfs":
            if quotas:
                self._reclaim.add(btrfs.workspace_qgroup(vid))
            self._dirty = True
            if self._reclaiming is None or self._reclaiming.done():
                self._reclaiming = tasks.spawn(self._give_back(), name="pool-reclaim")

    async def _give_back(self) -> None:
        """Once the cleaner has freed the deleted subvolumes: drop their qgroups and trim
        the pool, so that a loop-backed pool.img shrinks. All of it off the event loop;
        deletions meanwhile make one more round. A group whose extents a clone still
        holds stays, and is tried again after the next deletion."""
        while self._dirty:
            self._dirty = False
            if await self.cleaned(600.0):
                for group in sorted(self._reclaim):
                    if await asyncio.to_thread(btrfs.qgroup_destroy, self.root, group):
                        self._reclaim.discard(group)
            trimmed = await asyncio.to_thread(btrfs.fitrim, self.root)
            log.debug("pool trimmed", extra={"ctx": {"bytes": trimmed}})

    async def cleaned(self, timeout: float) -> bool:
        """Wait until the cleaner has freed the deleted subvolumes (False when
        ``timeout`` passed first). Polled from the event loop, each look in a thread:
        a daemon stopping meanwhile cancels the wait at once, leaving no thread
        behind that its shutdown would wait for."""
        deadline = time.monotonic() + timeout
        await asyncio.to_thread(btrfs.commit, self.root)
        while await asyncio.to_thread(btrfs.deletions_pending, self.root):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.2)
        await asyncio.to_thread(btrfs.commit, self.root)
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
