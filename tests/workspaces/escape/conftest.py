"""Fixtures of the escape suite's positive controls: a "dev" Debian image.

The escape tests show that attacks fail; the workload tests beside them show
that what developers really run (apt-get, pip, git, gcc, node, sudo, tmux, a
web server) still works under the same sandbox. They need den's ``dev`` image
(the preset ``den init`` builds) plus what only these tests use: the first
session builds it through den itself (``den init --image NAME --include ...``,
from the Debian mirror, packages from the tests' shared package cache; that run
is what tests/storage/test_dev_image.py checks) and keeps it as
``.cache/images/bookworm-dev-<recipe>.tar.zst``, named after a digest of the
recipe so that a change to the preset builds it anew; later sessions import
that tarball in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from den.storage.images import PRESETS
from tests.conftest import DEN, ROOT, Daemon
from tests.storage.conftest import images_dir, tar_dir, wait_job

DEV = "dev"
# Beyond the dev preset, what the workload tests run: node for a web server,
# adduser for the postinst of the .deb they install.
DEV_EXTRA = ["nodejs", "adduser"]
_RECIPE = json.dumps([PRESETS["dev"].include, PRESETS["dev"].locales, DEV_EXTRA])
DEV_CACHE = (
    ROOT
    / ".cache"
    / "images"
    / f"bookworm-dev-{hashlib.sha256(_RECIPE.encode()).hexdigest()[:12]}.tar.zst"
)


# The session's `den init` build of the dev image, by daemon (data directory): test_dev_image
# checks it rather than building the same image a second time.
INIT_BUILDS: dict[Path, dict[str, Any]] = {}


def apt_debs(d: Daemon) -> dict[str, int]:
    """The shared package cache: .deb name -> inode (a file fetched again is a new inode)."""
    return {p.name: p.stat().st_ino for p in Path(d.env["DEN_APT_CACHE"]).glob("*.deb")}


def init_build(d: Daemon, name: str, include: list[str]) -> dict[str, Any]:
    """Build image ``name`` on ``d``'s pool with `den init --yes --image NAME` (the dev
    preset): its output (a log: each kind of step a line), time, and the package cache
    before and after it."""
    argv = [DEN, "init", "--yes", "--image", name]
    if include:
        argv += ["--include", ",".join(include)]
    before = apt_debs(d)
    start = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        env=d.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=3600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out + err
    return {
        "name": name,
        "include": include,
        "out": out,
        "err": err,
        "before": before,
        "after": apt_debs(d),
        "seconds": time.monotonic() - start,
    }


def dev_image_as(d: Daemon, name: str) -> str:
    """The dev image as ``name`` on ``d``: imported from the cache, else built and cached.

    Several test trees have a session fixture of it on the same daemon: the
    first one makes it, the others find it there.
    """
    if any(i["name"] == name and i["state"] == "ready" for i in d.call("image.list")):
        return name
    if DEV_CACHE.is_file():
        done = wait_job(d, d.call("image.import", name=name, path=str(DEV_CACHE)), timeout=1800)
        if done["state"] != "done":
            DEV_CACHE.unlink()  # a stale or broken cache: build next time
        assert done["state"] == "done", done
    else:
        INIT_BUILDS[d.data_dir] = init_build(d, name, DEV_EXTRA)
    if not DEV_CACHE.is_file():
        DEV_CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = DEV_CACHE.with_suffix(f".tmp{os.getpid()}")
        try:
            tar_dir(images_dir(d) / name, tmp)
            tmp.rename(DEV_CACHE)
        finally:
            tmp.unlink(missing_ok=True)
        for old in DEV_CACHE.parent.glob("bookworm-dev*.tar.zst"):
            if old != DEV_CACHE:
                old.unlink(missing_ok=True)  # made from an older recipe
    return name


@pytest.fixture(scope="session")
def dev_image(pool_daemon: Daemon) -> str:
    """Image ``dev`` on the session's pool daemon: den's dev preset and DEV_EXTRA."""
    return dev_image_as(pool_daemon, DEV)
