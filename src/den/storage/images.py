"""Images: read-only root filesystems, built by debootstrap or imported from a tarball.

Every image is made in a fresh build subvolume (``images/.build-NAME-TAG``),
fixed up for use as many workspaces (:mod:`den.storage.rootfs`), then renamed
into place and made read-only. Whatever goes wrong on the way (an error, a
cancellation, a full pool) the build subvolume is discarded; a daemon killed
mid-build leaves one behind, which :func:`recover` removes at the next start.

The programs that fill a build run under ``setpriv --pdeathsig KILL``, so they
die with the daemon instead of writing on into a subvolume being deleted;
debootstrap also runs in its own mount and pid namespaces, so the /proc and
/sys it mounts inside the target vanish with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from den import proc
from den.db.models import Image
from den.errors import BackendFailure, DenError, InvalidParams
from den.storage import btrfs, debootstrap, rootfs
from den.storage.debootstrap import SCALE, ProgressFn
from den.storage.pool import Pool

log = logging.getLogger(__name__)

LOCALES_AT = 920  # where on the 0..SCALE progress scale locale-gen starts (debootstrap ends)
FIXUP_AT = 950  # where on the 0..SCALE progress scale the fix-ups start
# A build's own view of the package cache (see _deb_cache); one older than this
# was left by a daemon killed mid-build (builds time out after an hour).
STALE_CACHE_VIEW = 86400
# What programs run inside a fresh build see: none of the daemon's environment.
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
_CHUNK = 1 << 20
# (magic, tar flag, name); a plain tar has "ustar" at offset 257.
COMPRESSIONS = (
    (b"\x1f\x8b", "--gzip", "gzip"),
    (b"\xfd7zXZ\x00", "--xz", "xz"),
    (b"\x28\xb5\x2f\xfd", "--zstd", "zstd"),
    (b"BZh", "--bzip2", "bzip2"),
)
_CORRUPT = (  # what tar and the decompressors say about a damaged archive (lowercased)
    "unexpected eof",
    "unexpected end",
    "ends unexpectedly",
    "not in gzip format",
    "corrupt",
    "invalid compressed",
    "does not look like a tar archive",
    "unknown frame",
    "decoding error",
    "unsupported frame",
    "file format not recognized",
    "skipping to next header",
    "data integrity error",
    "crc error",
    "unknown format",
)


@dataclass(frozen=True)
class Built:
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class Preset:
    """A named recipe for ``image.build --preset`` and ``den init``: the one definition."""

    name: str
    summary: str
    include: tuple[str, ...]
    locales: tuple[str, ...] = ()  # /etc/locale.gen lines, compiled by locale-gen


# git for code.push (it runs inside the workspace), with what its transports need;
# OpenSSH's sftp-server for scp and sftp into a microVM, where den's own server
# cannot run (it serves sandbox workspaces from a worker that joins them).
_GIT = ("git", "ca-certificates", "openssh-client", "openssh-sftp-server")
PRESETS = {
    p.name: p
    for p in (
        Preset("debian", "minbase with git: small, for tests and those who want little", _GIT),
        Preset(
            "dev",
            "what a developer expects to find: a toolchain, python3 with venv and pip, "
            "sudo, editors, network tools, tmux, man pages, locales",
            (
                *_GIT,
                "curl",
                "python3",
                "python3-venv",
                "python3-pip",
                "build-essential",
                "sudo",
                "less",
                "vim-tiny",
                "nano",
                "procps",
                "iproute2",
                "iputils-ping",
                "locales",
                "tmux",
                "bash-completion",
                "man-db",
                "rsync",
                "unzip",
            ),
            locales=("C.UTF-8 UTF-8", "en_US.UTF-8 UTF-8"),
        ),
    )
}


# -- running the programs that fill a build ------------------------------------
async def _lines(stream: asyncio.StreamReader | None) -> AsyncIterator[str]:
    if stream is None:
        return
    buf = b""
    while chunk := await stream.read(65536):
        buf += chunk
        *done, buf = buf.split(b"\n")
        for raw in done:
            yield raw.decode(errors="replace")
    if buf:
        yield buf.decode(errors="replace")


async def _run(
    argv: list[str],
    *,
    on_line: Callable[[str], None] | None = None,
    feed: Path | None = None,
    on_fed: Callable[[int], None] | None = None,
    env: dict[str, str] | None = None,
    timeout: float,
) -> tuple[int, str]:
    """Run ``argv``; return its exit code and the tail of its stderr.

    Stdout lines go to ``on_line``; the file ``feed`` is written to its stdin.
    On cancellation or timeout the program is killed before this returns.
    """
    full = ["setpriv", "--pdeathsig", "KILL", "--", *argv]
    start = time.perf_counter()
    try:
        p = await asyncio.create_subprocess_exec(
            *full,
            stdin=asyncio.subprocess.PIPE if feed else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if on_line else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except FileNotFoundError as exc:
        raise BackendFailure(f"{full[0]} is not installed; run `den init`") from exc
    tail: deque[str] = deque(maxlen=40)

    async def stderr() -> None:
        async for line in _lines(p.stderr):
            tail.append(line)
            log.debug("%s: %s", argv[0], line)

    async def stdout() -> None:
        async for line in _lines(p.stdout):
            if on_line is not None:
                on_line(line)

    async def stdin() -> None:
        assert feed is not None and p.stdin is not None
        fed = 0
        try:
            with feed.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, _CHUNK):
                    p.stdin.write(chunk)
                    await p.stdin.drain()
                    fed += len(chunk)
                    if on_fed is not None:
                        on_fed(fed)
            p.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the program stopped reading: its exit code and stderr say why

    jobs = [stderr(), stdout()] + ([stdin()] if feed else [])
    try:
        await asyncio.wait_for(asyncio.gather(*jobs, p.wait()), timeout)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(p.wait())
        if isinstance(exc, TimeoutError):
            raise BackendFailure(
                f"{argv[0]} took longer than {timeout:.0f}s and was stopped"
            ) from None
        raise
    rc = p.returncode if p.returncode is not None else -1
    log.debug(
        "ran %s",
        " ".join(argv),
        extra={"ctx": {"rc": rc, "ms": round((time.perf_counter() - start) * 1e3, 1)}},
    )
    return rc, "\n".join(tail)


def _full(text: str) -> bool:
    return "No space left on device" in text or "Disk quota exceeded" in text


class PoolFull(BackendFailure):
    """The pool ran out of space while an image was being made."""


def _pool_full(pool: Pool, name: str) -> PoolFull:
    free = shutil.disk_usage(pool.root).free if pool.root.exists() else 0
    return PoolFull(
        f"the storage pool is full: image {name} does not fit ({free >> 20} MiB free); "
        "remove unused images (`den image rm`) or grow the pool"
    )


# -- the build lifecycle -------------------------------------------------------
def _discard(pool: Pool, path: Path) -> None:
    """Remove a failed build; retried because dying helpers may still hold it briefly."""
    for attempt in range(50):
        try:
            pool.discard(path)  # files, directories and subvolumes alike
            return
        except (DenError, OSError) as exc:
            if attempt == 49:
                log.error("cannot remove the failed build %s: %s", path, exc)
            time.sleep(0.1)


async def _reclaim(pool: Pool) -> None:
    """Wait until btrfs has really freed deleted subvolumes (else it does so lazily, in ~30 s);
    a failure to wait changes nothing of what the caller reports."""
    if pool.driver != "btrfs":
        return
    with contextlib.suppress(OSError, DenError):
        await pool.cleaned(120.0)


async def _make(
    pool: Pool, name: str, tag: str, fill: Callable[[Path], Awaitable[None]], progress: ProgressFn
) -> Built:
    try:
        build = await asyncio.to_thread(pool.new_build, name, tag)
    except OSError as exc:
        raise _pool_full(pool, name) if exc.errno == errno.ENOSPC else exc from None
    committing = False
    try:
        try:
            await fill(build)
            progress(FIXUP_AT, SCALE, "preparing the image for workspaces")
            await asyncio.to_thread(rootfs.fix_up, build)
            res = await proc.run(["du", "-s", "-x", "-B1", str(build)])
            size = int(res.stdout.split()[0])
            committing = True
            final = await asyncio.to_thread(pool.commit_build, build, name)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise _pool_full(pool, name) from None
            raise BackendFailure(f"cannot prepare image {name}: {exc}") from exc
        except BackendFailure as exc:
            if _full(exc.message):
                raise _pool_full(pool, name) from None
            raise
    except BaseException:
        leftover = build if build.exists() else pool.image_path(name) if committing else None
        if leftover is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(asyncio.to_thread(_discard, pool, leftover))
        if sys.exc_info()[0] is PoolFull:
            await _reclaim(pool)
        raise
    progress(SCALE, SCALE, "ready")
    return Built(final, size)


def _open_cache_view(shared: Path, tag: str) -> Path:
    """A build's own directory of the shared package cache, holding links to its .debs.

    debootstrap then reads and writes only this view: concurrent builds (of
    other daemons too) never download into the same file, and a package it
    finds damaged is dropped from the view, not from the shared cache.
    """
    shared.mkdir(mode=0o755, parents=True, exist_ok=True)
    now = time.time()
    for old in shared.glob(".build-*"):
        with contextlib.suppress(OSError):
            if now - old.lstat().st_mtime > STALE_CACHE_VIEW:
                shutil.rmtree(old, ignore_errors=True)
    view = shared / f".build-{tag}"
    # Downloads land in partial/ and reach the view only once their checksum matched.
    (view / "partial").mkdir(mode=0o755, parents=True)
    for deb in shared.glob("*.deb"):
        with contextlib.suppress(OSError):
            os.link(deb, view / deb.name, follow_symlinks=False)
    return view


def _close_cache_view(shared: Path, view: Path) -> int:
    """Keep the packages the build downloaded in the shared cache; drop the view.

    Returns how many were new. A file is only ever added whole (a link), never
    rewritten: one name is one Debian package version, whoever fetched it.
    """
    new = 0
    for entry in os.scandir(view):
        if entry.name.endswith(".deb") and entry.is_file(follow_symlinks=False):
            try:
                os.link(entry.path, shared / entry.name, follow_symlinks=False)
                new += 1
            except FileExistsError:
                pass
            except OSError as exc:  # the build is fine; only the next one downloads again
                log.warning("cannot keep packages in the package cache %s: %s", shared, exc)
                break
    shutil.rmtree(view, ignore_errors=True)
    return new


async def _gen_locales(target: Path, locales: tuple[str, ...], progress: ProgressFn) -> None:
    """Write /etc/locale.gen and run locale-gen in the fresh build.

    Only ever run on a build debootstrap just made from the Debian mirror
    (signature-checked packages), never on an imported tarball or a workspace:
    running a root filesystem's own programs as host root is trusting it.
    """
    names = [loc.split()[0] for loc in locales]
    done: list[str] = []

    def line(text: str) -> None:
        # locale-gen prints "  en_US.UTF-8... done" once a locale is compiled.
        if text.rstrip().endswith("done"):
            done.append(text.strip().split("...")[0])
            share = (FIXUP_AT - LOCALES_AT) * len(done) // max(len(names), 1)
            progress(LOCALES_AT + share, SCALE, f"generated locale {done[-1]}")

    progress(LOCALES_AT, SCALE, "generating locales " + ", ".join(names))
    script = (
        'printf "%s\\n" "# den: compiled when the image was built" "$@" >/etc/locale.gen'
        " && exec locale-gen"
    )
    rc, tail = await _run(
        ["chroot", str(target), "/bin/sh", "-c", script, "sh", *locales],
        on_line=line,
        env=CHROOT_ENV,
        timeout=900,
    )
    if rc != 0:
        why = (tail.strip().splitlines() or [f"exit {rc}"])[-1]
        raise BackendFailure(f"locale-gen failed: {why}", log_detail=tail[-2000:])


async def build(
    pool: Pool,
    name: str,
    tag: str,
    *,
    suite: str,
    includes: list[str],
    variant: str,
    mirror: str,
    progress: ProgressFn,
    locales: tuple[str, ...] = (),
    cache_dir: Path | None = None,
) -> Built:
    """Build image ``name`` with debootstrap; see the module docstring.

    With ``cache_dir`` the .debs are taken from and kept in that host
    directory (never in the image): packages are downloaded once per host.
    ``locales`` are compiled after debootstrap (the ``locales`` package must
    be among ``includes``).
    """
    debootstrap.check_suite(suite)
    parser = debootstrap.ProgressParser(progress)

    async def bootstrap(target: Path, view: Path | None) -> None:
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "--",
            "sh",
            "-c",
            'exec "$@" 3>&1 1>&2',
            "sh",
            *debootstrap.argv(target, suite, mirror, includes, variant, view),
        ]
        progress(0, SCALE, f"debootstrap {suite} from {mirror}")
        # dpkg syncs every file it unpacks; a build that dies is discarded whole,
        # so those syncs buy nothing and cost most of a rebuild's time.
        unsafe_io = target / "etc/dpkg/dpkg.cfg.d/den-build-unsafe-io"
        unsafe_io.parent.mkdir(mode=0o755, parents=True)
        unsafe_io.write_text("force-unsafe-io\n")
        rc, tail = await _run(argv, on_line=parser.feed, timeout=3600)
        if rc != 0:
            if _full(tail) or _full(parser.error):
                raise _pool_full(pool, name)
            why = parser.error or (tail.strip().splitlines() or [f"exit {rc}"])[-1]
            raise BackendFailure(f"debootstrap failed: {why}", log_detail=tail[-2000:])
        unsafe_io.unlink()
        for w in parser.warnings:
            log.info("debootstrap warning for image %s: %s", name, w)
        fetched = len(parser.downloaded)
        cached = len(parser.validated - parser.downloaded)
        log.info(
            "image %s: %d packages downloaded, %d taken from the package cache",
            name,
            fetched,
            cached,
        )
        # A step too: whoever follows the build (a job, den init) sees what it cost.
        progress(
            LOCALES_AT, SCALE, f"{fetched} packages downloaded, {cached} from the package cache"
        )

    async def fill(target: Path) -> None:
        if cache_dir is None:
            await bootstrap(target, None)
        else:
            view = await asyncio.to_thread(_open_cache_view, cache_dir, tag)
            try:
                await bootstrap(target, view)
            finally:
                # Kept even when the build failed: what was fetched need not be again.
                with contextlib.suppress(asyncio.CancelledError):
                    kept = await asyncio.shield(
                        asyncio.to_thread(_close_cache_view, cache_dir, view)
                    )
                    log.debug("image %s: %d new packages kept in %s", name, kept, cache_dir)
        if locales:
            await _gen_locales(target, locales, progress)

    return await _make(pool, name, tag, fill, progress)


def check_tarball(path: Path) -> str:
    """The tar flag for ``path``'s compression; InvalidParams when it cannot be an archive."""

    def bad(msg: str) -> InvalidParams:
        return InvalidParams(msg, field="path")

    if not path.is_absolute():
        raise bad(f"{path} is not an absolute path; the daemon reads it on its own host")
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            raise bad(f"{path} is not a regular file")
        with path.open("rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise bad(f"no file at {path}") from None
    except OSError as exc:
        raise bad(f"cannot read {path}: {exc.strerror}") from None
    if not head:
        raise bad(f"{path} is empty")
    for magic, flag, _ in COMPRESSIONS:
        if head.startswith(magic):
            return flag
    if len(head) == 512 and head[257:262] == b"ustar":
        return ""
    raise bad(f"{path} is not a tar archive (plain, gzip, xz, zstd or bzip2)")


async def import_tarball(
    pool: Pool, name: str, tag: str, tarball: Path, *, progress: ProgressFn
) -> Built:
    """Unpack a root filesystem tarball as image ``name``; see the module docstring."""
    flag = check_tarball(tarball)
    total = max(tarball.stat().st_size, 1)

    async def fill(target: Path) -> None:
        argv = [
            "tar",
            "-x",
            "-f",
            "-",
            "-C",
            str(target),
            "--numeric-owner",
            "--same-owner",
            "--same-permissions",
            "--xattrs",
            "--xattrs-include=*",
            "--xattrs-exclude=security.selinux",
            "--acls",
            "--warning=no-unknown-keyword",
            *([flag] if flag else []),
        ]
        progress(0, SCALE, f"unpacking {tarball.name}")
        rc, tail = await _run(
            argv,
            feed=tarball,
            on_fed=lambda n: progress(
                n * (FIXUP_AT - 1) // total, SCALE, f"unpacking {tarball.name}"
            ),
            timeout=3600,
        )
        if rc != 0:
            if _full(tail):
                raise _pool_full(pool, name)
            detail = "; ".join(ln for ln in tail.strip().splitlines()[-3:] if ln) or f"exit {rc}"
            if any(c in tail.lower() for c in _CORRUPT):
                raise InvalidParams(
                    f"cannot unpack {tarball}: the archive is corrupt or truncated ({detail})",
                    field="path",
                )
            raise BackendFailure(f"cannot unpack {tarball}: {detail}")
        why = rootfs.looks_like_rootfs(target)
        if why:
            raise InvalidParams(
                f"{tarball} holds no root filesystem: {why} (make the tarball from inside the "
                "root, e.g. `tar -C ROOT -czf FILE .` or `podman export`)",
                field="path",
            )

    return await _make(pool, name, tag, fill, progress)


# -- recovery at start ---------------------------------------------------------
async def recover(pool: Pool, sessions: async_sessionmaker[AsyncSession]) -> None:
    """Remove what interrupted builds left behind; adopt finished images without a record.

    Runs at daemon start: Image rows not ``ready`` and their directories go, so
    do ``.build-*`` subvolumes. An image directory the database does not know
    (a lost database) becomes a ``ready`` image of source ``adopted`` if it is
    a root filesystem, else it is removed.
    """
    from den.services.common import NAME_RE

    async with sessions() as db:
        known: set[str] = set()
        for img in (await db.execute(select(Image))).scalars().all():
            if img.state == "ready":
                known.add(img.name)
                continue
            log.warning("removing image %s left %s by an interrupted build", img.name, img.state)
            await asyncio.to_thread(_discard, pool, pool.image_path(img.name))
            await db.delete(img)
        for path in pool.leftover_builds():
            log.warning("removing the leftover build %s", path.name)
            await asyncio.to_thread(_discard, pool, path)
        found = sorted(pool.images.iterdir()) if pool.images.exists() else []
        for path in found:
            if path.name.startswith(".") or path.name in known:
                continue
            if _adoptable(pool, path, NAME_RE.fullmatch(path.name) is not None):
                log.warning("adopting image %s found in the pool without a record", path.name)
                if pool.driver == "btrfs":
                    btrfs.set_read_only(path, True)
                res = await proc.run(["du", "-s", "-x", "-B1", str(path)], check=False)
                size = int(res.stdout.split()[0]) if res.returncode == 0 else 0
                db.add(Image(name=path.name, source="adopted", state="ready", size_bytes=size))
            else:
                log.warning("removing %s from the pool: not an image", path.name)
                await asyncio.to_thread(_discard, pool, path)
        await db.commit()


def _adoptable(pool: Pool, path: Path, good_name: bool) -> bool:
    if not good_name or path.is_symlink() or not path.is_dir() or rootfs.looks_like_rootfs(path):
        return False
    return pool.driver != "btrfs" or btrfs.is_subvolume(path)
