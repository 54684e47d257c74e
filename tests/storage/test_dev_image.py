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
    """An image built by `den init --image NAME` (not a preset name: the dev preset)."""
    d = pool_daemon
    name = f"devi{secrets.token_hex(2)}"
    start = time.monotonic()
    res = subprocess.run(
        [DEN, "init", "--yes", "--image", name],
        env=d.env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        yield {"name": name, "out": res.stdout, "seconds": time.monotonic() - start}
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
def test_a_rebuild_downloads_nothing(pool_daemon: Daemon, built: dict[str, Any]) -> None:
    """`den image build NAME --preset dev` with the cache warm: no .deb is fetched again,
    and the steps after debootstrap (locales) report progress too."""
    d = pool_daemon
    before = _debs(d)
    name = f"devr{secrets.token_hex(2)}"
    job = d.call("image.build", name=name, preset="dev")
    steps: list[str] = []
    try:
        start = time.monotonic()
        while job["state"] == "running":
            assert time.monotonic() - start < 3600, job
            if not steps or steps[-1] != job["step"]:
                steps.append(job["step"])
            time.sleep(0.1)
            job = d.call("job.get", id=job["id"])
        assert job["state"] == "done", job
        seconds = time.monotonic() - start
    finally:
        if (images_dir(d) / name).exists():
            d.call("image.delete", name=name)
    log = d.log_file.read_text()
    assert f"image {name}: 0 packages downloaded" in log
    after = _debs(d)
    assert {n: after.get(n) for n in before} == before  # nothing fetched anew
    assert any(s.startswith("Validating ") for s in steps), steps
    assert any(s.startswith(("generating locales", "generated locale")) for s in steps), steps
    # Well under the first build's time on a fresh clone (its downloads).
    print(f"first build {built['seconds']:.0f}s, rebuild {seconds:.0f}s")


def test_presets_are_checked(daemon: Daemon) -> None:
    err = daemon.error("image.build", name="nope", preset="bogus")
    assert err.code == -32602 and "preset" in str(err.data), (err.message, err.data)
    assert all(i["name"] != "nope" for i in daemon.call("image.list"))
    res = daemon.cli("init", "--image", "x", "--preset", "bogus")
    assert res.returncode == 2 and "no preset 'bogus'; presets: debian, dev" in res.stderr
