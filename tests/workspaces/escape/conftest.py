"""Fixtures of the escape suite's positive controls: a "dev" Debian image.

The escape tests show that attacks fail; the workload tests beside them show
that what developers really run (apt-get, pip, git, gcc, node, sudo, tmux, a
web server) still works under the same sandbox. They need a fuller image than
minbase: the first session builds it through den itself (``image.build`` with
debootstrap, from the Debian mirror) and keeps it as
``.cache/images/bookworm-dev.tar.zst``; later sessions import that tarball in
seconds. A fresh build took about 2 minutes here (2 cores, the
image 200 MB as a tarball); an import of the cache takes seconds.
"""

from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT, Daemon
from tests.storage.conftest import images_dir, tar_dir, wait_job

DEV = "dev"
DEV_CACHE = ROOT / ".cache" / "images" / "bookworm-dev.tar.zst"
# What the workload tests run, and no more: each package costs build time on
# every fresh clone. adduser and iputils-ping are what a postinst and a
# developer's ping reach for; xz-utils lets dpkg read any .deb.
DEV_PACKAGES = [
    "ca-certificates",
    "git",
    "gcc",
    "libc6-dev",
    "make",
    "python3",
    "python3-venv",
    "nodejs",
    "sudo",
    "tmux",
    "procps",
    "adduser",
    "iputils-ping",
]


def dev_image_as(d: Daemon, name: str) -> str:
    """The dev image as ``name`` on ``d``: imported from the cache, else built and cached."""
    if DEV_CACHE.is_file():
        job = d.call("image.import", name=name, path=str(DEV_CACHE))
    else:
        job = d.call(
            "image.build", name=name, suite="bookworm", variant="minbase", include=DEV_PACKAGES
        )
    done = wait_job(d, job, timeout=1800)
    if done["state"] != "done" and DEV_CACHE.is_file():
        DEV_CACHE.unlink()  # a stale or broken cache: build next time
    assert done["state"] == "done", done
    if not DEV_CACHE.is_file():
        DEV_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = DEV_CACHE.with_suffix(f".tmp{os.getpid()}")
        try:
            tar_dir(images_dir(d) / name, tmp)
            tmp.rename(DEV_CACHE)
        finally:
            tmp.unlink(missing_ok=True)
    return name


@pytest.fixture(scope="session")
def dev_image(pool_daemon: Daemon) -> str:
    """Image ``dev`` on the session's pool daemon: bookworm minbase with build tools."""
    return dev_image_as(pool_daemon, DEV)
