"""The dev image: what `den init` builds by default, with what a developer expects.

The image is built by `den init` itself (its preset, its code path), with the
test daemons' shared package cache under ``.cache/apt``: a fresh clone
downloads the packages once, later sessions and rebuilds take them from there.
When the session built its dev image (the preset and DEV_EXTRA, through
`den init --include`) these tests check that build; when it imported the image
from the tests' cache they run `den init` here.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from den.storage.images import PRESETS
from tests.conftest import Daemon
from tests.storage.conftest import images_dir
from tests.workspaces.conftest import create, make_users, ok
from tests.workspaces.escape.conftest import (
    INIT_BUILDS,
    apt_debs,
    dev_image_as,
    init_build,
)

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


@pytest.fixture(scope="module")
def built(pool_daemon: Daemon) -> Iterator[dict[str, Any]]:
    """An image built by `den init --image NAME` (the dev preset), its output (a log:
    each kind of step a line) and the package cache before and after it.

    In a fresh clone that is the session's dev image (kept: other tests use it),
    built from the mirror by whichever test tree needed it first. Else the session
    imported its dev image from the tests' cache, with the package cache warm: this
    build of the bare preset under a name that is not a preset's is the rebuild that
    must fetch nothing the cache holds.
    """
    d = pool_daemon
    if d.data_dir not in INIT_BUILDS:  # no tree built the session's dev image yet
        dev_image_as(d, "dev")
    if d.data_dir in INIT_BUILDS:
        yield INIT_BUILDS[d.data_dir]
        return
    name = f"devi{secrets.token_hex(2)}"
    try:
        yield init_build(d, name, [])
    finally:
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
    out, name = built["out"], built["name"]
    plus = f" + {', '.join(built['include'])}" if built["include"] else ""
    assert f"building image {name} (preset dev){plus}: " in out, out
    assert str(_cache(pool_daemon)) in out  # where the packages are kept
    assert f"image {name}: ready" in out
    if name == "dev":  # the default image: nothing to add
        assert "default_image" not in out, out
    else:  # not the default image: den init says how to use it
        assert "new workspaces use image dev (default_image)" in out
        assert f"`den new --image {name}`" in out
    res = pool_daemon.cli("init", "--check", "--image", name)
    assert f"ok   image {name}: built" in res.stdout, res.stdout
    res = pool_daemon.cli("init", "--check", "--image", "nosuchimage")
    assert res.returncode == 1
    assert "MISSING image nosuchimage: not built yet: den init builds it (preset dev)" in (
        res.stdout
    )
    img = pool_daemon.call("image.get", name=name)
    preset = set(PRESETS["dev"].include)
    assert preset | set(built["include"]) == set(img["includes"]), img["includes"]
    assert {"python3-venv", "build-essential", "locales", "tmux"} <= preset


def test_init_include_is_checked(pool_daemon: Daemon) -> None:
    """--include takes Debian package names only, before den init changes anything."""
    res = pool_daemon.cli("init", "--yes", "--image", "badinc", "--include", "git,-rf /")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "error: --include: a Debian package name is" in res.stderr, res.stderr
    assert "badinc" not in {i["name"] for i in pool_daemon.call("image.list")}
    res = pool_daemon.cli("init", "--yes", "--no-image", "--include", "git")
    assert res.returncode == 2 and "not with --no-image" in res.stderr, res.stderr


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
    debs = apt_debs(pool_daemon)
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
    """The build fetched no .deb the package cache held (with the cache warm, the
    imported-image case, that is a rebuild from the cache; test_images checks it every
    session too), said how many it downloaded, and the steps after debootstrap (locales)
    report progress too."""
    before, after = built["before"], built["after"]
    assert {n: after.get(n) for n in before} == before  # nothing fetched anew
    fetched = len(set(after) - set(before))
    # den init's output is a log here (not a terminal): each kind of step is a line.
    err = built["err"]
    assert f"{fetched} packages downloaded" in err, err[-3000:]
    assert f"image {built['name']}: " in err and "% Validating " in err, err[-3000:]
    assert "generating locales" in err or "generated locale" in err, err[-3000:]
    print(f"den init build: {built['seconds']:.0f}s, {fetched} packages downloaded")
