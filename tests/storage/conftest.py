"""Image fixtures: one debootstrap image per test session, cached as a tarball.

The first session builds ``bookworm`` minbase (with git, which code.push runs
inside a workspace) with debootstrap and keeps the result as
``.cache/images/bookworm-minbase-git-sftp.tar.zst``; later sessions import
that tarball instead (seconds instead of a minute). ``test_images`` keeps one
real debootstrap build that always runs.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Daemon, running_daemon

CACHE = ROOT / ".cache" / "images" / "bookworm-minbase-git-sftp.tar.zst"
BASE = "base"


def wait_job(d: Daemon, job: dict[str, Any], timeout: float = 1200) -> dict[str, Any]:
    """Poll a job until it ends; return its final state."""
    deadline = time.monotonic() + timeout
    while job["state"] == "running":
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job['id']} still running after {timeout}s: {job}")
        time.sleep(0.2)
        job = d.call("job.get", id=job["id"])
    return job


def images_dir(d: Daemon) -> Path:
    return d.data_dir / "pool" / "images"


def pool_entries(d: Daemon) -> set[str]:
    """Everything in the pool's images directory (builds included)."""
    return {p.name for p in images_dir(d).iterdir()}


def tar_dir(src: Path, out: Path, compress: str = "--zstd") -> Path:
    """A tarball of the inside of ``src`` (ids, modes and xattrs kept)."""
    flags = [compress] if compress else []
    subprocess.run(
        [
            "tar",
            *flags,
            "-C",
            str(src),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
            "-cpf",
            str(out),
            ".",
        ],
        check=True,
    )
    return out


def debian_image_as(d: Daemon, name: str) -> dict[str, Any]:
    """Debian bookworm minbase with git as image ``name`` on ``d``: imported from the
    cached tarball, else built with debootstrap (and then cached for later sessions)."""
    if CACHE.is_file():
        job = d.call("image.import", name=name, path=str(CACHE))
    else:
        job = d.call(
            "image.build",
            name=name,
            suite="bookworm",
            variant="minbase",
            include=["git", "openssh-sftp-server"],
        )
    done = wait_job(d, job)
    if done["state"] != "done" and CACHE.is_file():
        CACHE.unlink()  # a stale or broken cache: build next time
    assert done["state"] == "done", done
    if not CACHE.is_file():
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(f".tmp{os.getpid()}")
        try:
            tar_dir(images_dir(d) / name, tmp)
            tmp.rename(CACHE)
        finally:
            tmp.unlink(missing_ok=True)
    return {"name": name, "path": images_dir(d) / name, "job": done}


@pytest.fixture(scope="session")
def base_image(pool_daemon: Daemon) -> dict[str, Any]:
    """The session's image ``base`` (bookworm minbase): imported from the cache or built."""
    return debian_image_as(pool_daemon, BASE)


@contextmanager
def own_pool_daemon(size: str) -> Iterator[Daemon]:
    """A daemon with a loopback pool of its own (for tests that fill or kill it)."""
    with running_daemon(pool=size) as d:
        yield d


def make_rootfs(root: Path, victim: Path) -> Path:
    """A tiny root filesystem with everything the fix-ups must undo.

    ``etc/hostname`` is a symlink to ``victim`` on the host: a hostile image
    trying to make the fix-ups write outside it.
    """
    for d in (
        "etc/ssh",
        "etc/skel",
        "usr/bin",
        "var/lib/dbus",
        "var/cache/apt/archives/partial",
        "var/lib/apt/lists/partial",
        "root",
        "tmp",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    for key in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub", "ssh_host_rsa_key"):
        (root / "etc/ssh" / key).write_text("secret host key\n")
    (root / "etc/ssh/sshd_config").write_text("Port 22\n")
    (root / "etc/resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    (root / "etc/hostname").symlink_to(victim)
    (root / "var/cache/apt/archives/foo_1.0_amd64.deb").write_bytes(b"deb")
    (root / "var/cache/apt/pkgcache.bin").write_bytes(b"cache")
    (root / "var/lib/apt/lists/deb.debian.org_Packages").write_text("Package: x\n")
    sh = root / "usr/bin/sh"
    sh.write_text("#!/bin/true\n")
    sh.chmod(0o755)
    su = root / "usr/bin/su"
    su.write_text("setuid\n")
    su.chmod(0o4755)
    owned = root / "etc/owned"
    owned.write_text("by 1234\n")
    os.chown(owned, 1234, 2345)
    os.setxattr(owned, "user.den", b"kept")
    (root / "tmp").chmod(0o1777)
    return root
