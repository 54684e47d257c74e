"""The dev image: what `den init` builds by default, with what a developer expects.

The image is built by `den init` itself (its preset, its code path), with the
test daemons' shared package cache under ``.cache/apt``: a fresh clone
downloads the packages once, later sessions and rebuilds take them from there.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DEN, Daemon
from tests.storage.conftest import images_dir
from tests.workspaces.conftest import create, make_users, ok
from tests.workspaces.escape.conftest import dev_image_as

# The command each listed package is found by (the list, and what
# python3 -m venv, pip and build-essential bring).
TOOLS = [
    "git",
    "curl",
    "ssh",
    "python3",
    "pip3",
    "cc",
    "gcc",
    "make",
    "sudo",
    "less",
    "vi",
    "nano",
    "ps",
    "top",
    "ip",
    "ping",
    "tmux",
    "man",
    "rsync",
    "unzip",
    "locale",
    "bash",
]


def _cache(d: Daemon) -> Path:
    return Path(d.env["DEN_APT_CACHE"])


def _debs(d: Daemon) -> dict[str, int]:
    """The shared package cache: .deb name -> inode (a file fetched again is a new inode)."""
    return {p.name: p.stat().st_ino for p in _cache(d).glob("*.deb")}


@pytest.fixture(scope="module")
def built(pool_daemon: Daemon) -> Iterator[dict[str, Any]]:
    """An image built by `den init --image NAME` (not a preset name: the dev preset),
    its output (a log: each kind of step a line) and the package cache before it.

    The session's dev image (a superset of the preset) is made first: in a fresh
    clone it is built from the mirror into the shared package cache, so this
    build is the rebuild that must fetch nothing the cache holds.
    """
    d = pool_daemon
    dev_image_as(d, "dev")
    name = f"devi{secrets.token_hex(2)}"
    before = _debs(d)
    start = time.monotonic()
    proc = subprocess.Popen(
        [DEN, "init", "--yes", "--image", name],
        stdin=subprocess.DEVNULL,
        env=d.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=3600)
        assert proc.returncode == 0, out + err
        yield {
            "name": name,
            "out": out,
            "err": err,
            "before": before,
            "seconds": time.monotonic() - start,
        }
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if (images_dir(d) / name).exists():
            d.call("image.delete", name=name)


@pytest.fixture(scope="module")
def ws(pool_daemon: Daemon, built: dict[str, Any]) -> Iterator[str]:
    with make_users(pool_daemon) as users:
        owner = users.make()
        made = create(pool_daemon, owner, f"dev{secrets.token_hex(2)}", image=built["name"])
        yield f"{owner}/{made['name']}"


@pytest.mark.slow
def test_init_builds_the_dev_preset_and_says_how_to_use_it(
    pool_daemon: Daemon, built: dict[str, Any]
) -> None:
    out = built["out"]
    assert f"building image {built['name']} (preset dev)" in out, out
    assert str(_cache(pool_daemon)) in out  # where the packages are kept
    assert f"image {built['name']}: ready" in out
    # Not the default image: den init says how to use it.
    assert "new workspaces use image dev (default_image)" in out
    assert f"`den new --image {built['name']}`" in out
    res = pool_daemon.cli("init", "--check", "--image", built["name"])
    assert f"ok   image {built['name']}: built" in res.stdout, res.stdout
    res = pool_daemon.cli("init", "--check", "--image", "nosuchimage")
    assert res.returncode == 1
    assert "MISSING image nosuchimage: not built yet: den init builds it (preset dev)" in (
        res.stdout
    )
    img = pool_daemon.call("image.get", name=built["name"])
    assert {"python3-venv", "build-essential", "locales", "tmux"} <= set(img["includes"])


@pytest.mark.slow
def test_every_tool_is_there(pool_daemon: Daemon, ws: str) -> None:
    script = 'for t in "$@"; do command -v "$t" >/dev/null || echo "missing $t"; done'
    res = pool_daemon.call("workspace.exec", ref=ws, argv=["bash", "-c", script, "bash", *TOOLS])
    assert res["exit_code"] == 0 and res["stdout"] == "", res
    assert ok(pool_daemon, ws, "cat /etc/debian_version").startswith("12.")


@pytest.mark.slow
def test_python_venv_and_pip(pool_daemon: Daemon, ws: str) -> None:
    out = ok(
        pool_daemon,
        ws,
        "python3 -m venv /tmp/v && /tmp/v/bin/python -c 'import sys; print(sys.prefix)'"
        " && /tmp/v/bin/pip --version",
    )
    assert out.startswith("/tmp/v\npip "), out


@pytest.mark.slow
def test_a_c_program_builds(pool_daemon: Daemon, ws: str) -> None:
    script = (
        "cd /tmp && printf '#include <stdio.h>\\nint main(void){puts(\"built\");}\\n' > h.c"
        " && printf 'h: h.c\\n\\tcc -o h h.c\\n' > Makefile && make -s && ./h"
    )
    assert ok(pool_daemon, ws, script) == "built\n"


@pytest.mark.slow
def test_locales(pool_daemon: Daemon, ws: str) -> None:
    names = ok(pool_daemon, ws, "locale -a").split()
    assert {"C.utf8", "en_US.utf8"} <= set(names), names
    res = pool_daemon.call(
        "workspace.exec",
        ref=ws,
        argv=["locale", "charmap"],
        env={"LC_ALL": "en_US.UTF-8"},
    )
    assert res["exit_code"] == 0 and res["stdout"] == "UTF-8\n" and res["stderr"] == "", res


@pytest.mark.slow
def test_the_packages_stay_outside_the_image(
    pool_daemon: Daemon, built: dict[str, Any], ws: str
) -> None:
    debs = _debs(pool_daemon)
    assert any(n.startswith("git_") for n in debs) and any(
        n.startswith("python3-venv_") for n in debs
    ), sorted(debs)[:20]
    inside = ok(
        pool_daemon,
        ws,
        "find /var/cache/apt /var/lib/apt/lists -type f ! -name lock | head; "
        "find / -xdev -name '*.deb' | head",
    )
    assert inside == "", inside


@pytest.mark.slow
def test_a_build_fetches_nothing_the_cache_holds(
    pool_daemon: Daemon, built: dict[str, Any]
) -> None:
    """A build with the package cache warm (the session's dev image filled it) fetches
    no .deb the cache holds, and the steps after debootstrap (locales) report progress too."""
    d = pool_daemon
    before, after = built["before"], _debs(d)
    assert {n: after.get(n) for n in before} == before  # nothing fetched anew
    fetched = len(set(after) - set(before))
    # den init's output is a log here (not a terminal): each kind of step is a line.
    err = built["err"]
    assert f"{fetched} packages downloaded" in err, err[-3000:]
    assert f"image {built['name']}: " in err and "% Validating " in err, err[-3000:]
    assert "generating locales" in err or "generated locale" in err, err[-3000:]
    print(f"build with a warm cache: {built['seconds']:.0f}s, {fetched} packages downloaded")
