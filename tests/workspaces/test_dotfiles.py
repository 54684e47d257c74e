"""Dotfiles: a repository cloned inside a new workspace as its user and installed.

The repositories are bare ones this test makes, served over git's dumb HTTP by
``python3 -m http.server`` on an outside host (a network namespace of the
test's own, tests/helpers/outside.py) at an address den's egress policy
leaves open: the clone runs inside the workspace, as the workspace's user.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.helpers.outside import outside_host
from tests.storage.conftest import wait_job
from tests.workspaces.conftest import Users, create, invalid, ok, sh, wait_for

# The escape suite's dev image (it has git); its fixture is imported, so the
# parameters of that name below are not redefinitions.
from tests.workspaces.escape.conftest import dev_image  # noqa: F401

# ruff: noqa: F811

SECRET = "s3cretT0ken"
INSTALL = """#!/bin/sh
echo "installing for $(id -un) in $PWD"
echo marker > "$HOME/.den-dotfiles-marker"
"""
FAILING = """#!/bin/sh
echo "about to fail"
exit 3
"""
SLOW = """#!/bin/sh
touch "$HOME/.den-dotfiles-started"
exec sleep 300
"""


@dataclass(frozen=True)
class Server:
    base: str  # http://ADDRESS:PORT/dots

    def url(self, repo: str, cred: str = "") -> str:
        scheme, _, rest = self.base.partition("://")
        return f"{scheme}://{cred + '@' if cred else ''}{rest}/{repo}.git"


def _git(*args: str, cwd: Path) -> None:
    env = {**os.environ, "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def _bare(root: Path, name: str, files: dict[str, tuple[str, int]]) -> None:
    """A bare repository ``root/dots/NAME.git`` holding ``files`` (path: (text, mode))."""
    work = root / "work" / name
    work.mkdir(parents=True)
    for path, (text, mode) in files.items():
        f = work / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        f.chmod(mode)
    _git("init", "-q", "-b", "main", cwd=work)
    _git("add", "-A", cwd=work)
    ident = ["-c", "user.name=den test", "-c", "user.email=test@example.org"]
    _git(*ident, "commit", "-q", "-m", "dotfiles", cwd=work)
    bare = root / "dots" / f"{name}.git"
    _git("clone", "-q", "--bare", str(work), str(bare), cwd=root)
    _git("update-server-info", cwd=bare)  # what the dumb HTTP protocol reads


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    root = Path(tempfile.mkdtemp(prefix="den-dotfiles-"))
    try:
        _bare(root, "install", {"install.sh": (INSTALL, 0o755), ".bashrc": ("# unused\n", 0o644)})
        _bare(
            root,
            "linked",
            {
                ".bashrc": ("# from the dotfiles\n", 0o644),
                ".config/den-test/conf": ("x\n", 0o644),
                ".github/workflows/ci.yml": ("on: push\n", 0o644),
                "README.md": ("not linked\n", 0o644),
            },
        )
        _bare(root, "failing", {"install.sh": (FAILING, 0o755)})
        _bare(root, "slow", {"install.sh": (SLOW, 0o755)})
        with outside_host() as host:
            port = 8080  # the outside host is the test's own
            argv = ["/usr/bin/python3", "-m", "http.server", "--bind", host.address]
            proc = host.start([*argv, "--directory", str(root), str(port)], root / "http.log")
            base = f"http://{host.address}:{port}/dots"
            deadline = time.monotonic() + 15
            while True:
                try:
                    urllib.request.urlopen(f"{base}/install.git/HEAD", timeout=2).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise
                    time.sleep(0.1)
            yield Server(base)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def settled(d: Daemon, ref: str, timeout: float = 120) -> dict[str, Any]:
    """``den show`` of ``ref`` once its dotfiles are no longer running."""
    deadline = time.monotonic() + timeout
    while True:
        ws: dict[str, Any] = d.call("workspace.get", ref=ref)
        if ws["dotfiles_state"] != "running":
            return ws
        assert time.monotonic() < deadline, ws
        time.sleep(0.2)


def dotfiles_job(d: Daemon, ref: str) -> dict[str, Any]:
    jobs = [j for j in d.call("job.list") if j["kind"] == "workspace.dotfiles"]
    mine = [j for j in jobs if j["target"] == f"workspace:{ref}"]
    assert mine, jobs
    return wait_job(d, mine[-1], timeout=120)


def test_install_script_runs_as_the_user(
    pool_daemon: Daemon, dev_image: str, users: Users, server: Server
) -> None:
    d = pool_daemon
    owner = users.make()
    url = server.url("install", cred=f"den:{SECRET}")  # the server asks for none
    ws = create(d, owner, "dots", image=dev_image, dotfiles=url)
    ref = ws["ref"]
    # den new returns before the dotfiles are done; the workspace is usable at once
    assert ws["state"] == "running" and ws["dotfiles_state"] in ("running", "ok"), ws
    shown = settled(d, ref)
    assert shown["state"] == "running"
    assert shown["dotfiles_state"] == "ok", shown
    assert f"installing for {owner} in /home/{owner}/.dotfiles" in shown["dotfiles_log"], shown
    # the marker is in the user's home, owned by the user
    out = ok(d, ref, f"stat -c '%U %u' /home/{owner}/.den-dotfiles-marker", user="root")
    assert out.split() == [owner, "1000"], out
    out = ok(d, ref, f"stat -c '%U' /home/{owner}/.dotfiles/install.sh", user="root")
    assert out.strip() == owner
    # an install script means no linking
    assert sh(d, ref, f"test -L /home/{owner}/.bashrc", user="root")["exit_code"] != 0
    assert dotfiles_job(d, ref)["state"] == "done"
    # the token is masked in what den shows and in its audit log and daemon log
    assert shown["dotfiles_url"] == server.url("install", cred="den:***"), shown
    assert SECRET not in str(shown)
    # a refused call carrying the token is audited without it too
    bad = f"https://den:{SECRET}@host/org/dots;x"
    invalid(d, "workspace.create", "dotfiles", name="bad", user=owner, dotfiles=bad)
    c = d.client()
    try:  # (Daemon.call has a parameter named method)
        audit = c.call("audit.list", {"method": "workspace.create", "limit": 50})
    finally:
        c.close()
    mine = [e for e in audit if e["params"].get("user") == owner]
    assert {e["outcome"] for e in mine} == {"ok", "invalid_params"}, mine
    assert "://***@" in str(mine) and SECRET not in str(audit), mine
    assert SECRET not in d.log_text()


def test_user_default_links_dotfiles_and_runs_again(
    pool_daemon: Daemon, dev_image: str, users: Users, server: Server
) -> None:
    d = pool_daemon
    owner = users.make()
    url = server.url("linked")
    user = d.call("user.update", name=owner, dotfiles=url)
    assert user["dotfiles_url"] == url
    # the user's default applies to a workspace without --dotfiles ...
    ws = create(d, owner, "linked", image=dev_image)
    ref, home = ws["ref"], f"/home/{owner}"
    shown = settled(d, ref)
    assert shown["dotfiles_state"] == "ok" and shown["dotfiles_url"] == url, shown
    assert "linking the dotfiles" in shown["dotfiles_log"], shown
    assert (
        ok(d, ref, f"readlink {home}/.bashrc", user="root").strip() == f"{home}/.dotfiles/.bashrc"
    )
    assert ok(d, ref, f"cat {home}/.config/den-test/conf", user=owner) == "x\n"
    # the repository's own files and plain names stay in the clone
    for name in (".git", ".github", "README.md"):
        assert sh(d, ref, f"test -e {home}/{name}", user="root")["exit_code"] != 0, name
    # the image's .bashrc (from /etc/skel) was moved aside, not overwritten
    if sh(d, ref, "test -f /etc/skel/.bashrc")["exit_code"] == 0:
        ok(d, ref, f"cmp /etc/skel/.bashrc {home}/.dotfiles-backup/.bashrc", user="root")
        assert "moved the existing ~/.bashrc" in shown["dotfiles_log"]
    # ... and `den dotfiles` runs them again: an update of the clone, links kept
    job = d.call("workspace.dotfiles", ref=ref)
    busy = d.error("workspace.dotfiles", ref=ref)  # one run at a time
    assert busy.code == -32002 and job["id"] in busy.message, busy
    assert wait_job(d, job, timeout=120)["state"] == "done"
    again = settled(d, ref)
    assert again["dotfiles_state"] == "ok" and "updating" in again["dotfiles_log"], again
    assert sh(d, ref, f"test -L {home}/.bashrc", user="root")["exit_code"] == 0
    # an empty --dotfiles: none for this workspace, whatever the user's default
    none = create(d, owner, "plain", image=dev_image, dotfiles="")
    assert none["dotfiles_state"] == "" and none["dotfiles_url"] == ""
    assert d.call("workspace.get", ref=none["ref"])["dotfiles_log"] is None


def test_failures_leave_the_workspace_running(
    pool_daemon: Daemon, dev_image: str, users: Users, server: Server
) -> None:
    d = pool_daemon
    owner = users.make()
    # an install script that exits non-zero
    ws = create(d, owner, "failing", image=dev_image, dotfiles=server.url("failing"))
    ref = ws["ref"]
    shown = settled(d, ref)
    assert shown["state"] == "running"
    assert shown["dotfiles_state"] == "failed", shown
    log = shown["dotfiles_log"]
    assert "about to fail" in log and "install.sh exited with 3" in log, log
    assert f"den dotfiles {ref}" in log, log  # how to try again
    job = dotfiles_job(d, ref)
    assert job["state"] == "failed" and "exited with 3" in job["error"], job
    assert ok(d, ref, "echo usable") == "usable\n"
    # a clone that fails: the workspace runs, den show says why
    ws = create(d, owner, "missing", image=dev_image, dotfiles=server.url("missing"))
    shown = settled(d, ws["ref"])
    assert shown["state"] == "running" and shown["dotfiles_state"] == "failed", shown
    assert "cloning" in shown["dotfiles_log"] and "not found" in shown["dotfiles_log"], shown
    # and another repository can be given to run again
    job = d.call("workspace.dotfiles", ref=ws["ref"], url=server.url("install"))
    assert wait_job(d, job, timeout=120)["state"] == "done"
    assert settled(d, ws["ref"])["dotfiles_state"] == "ok"


def test_a_run_the_daemon_lost_shows_failed(
    pool_daemon: Daemon, dev_image: str, users: Users, server: Server
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "slow", image=dev_image, dotfiles=server.url("slow"))
    ref, home = ws["ref"], f"/home/{owner}"
    started = f"test -e {home}/.den-dotfiles-started"
    assert wait_for(lambda: sh(d, ref, started, user="root")["exit_code"] == 0, timeout=60)
    assert d.call("workspace.get", ref=ref)["dotfiles_state"] == "running"
    d.stop(signal.SIGKILL)  # no chance to record anything
    d.start()
    shown = d.call("workspace.get", ref=ref)
    assert shown["dotfiles_state"] == "failed", shown
    assert "daemon stopped" in shown["dotfiles_log"], shown
    assert f"den dotfiles {ref}" in shown["dotfiles_log"], shown
    # another repository: the clone of the first is moved aside, not mixed in
    job = d.call("workspace.dotfiles", ref=ref, url=server.url("install"))
    assert wait_job(d, job, timeout=120)["state"] == "done"
    shown = settled(d, ref)
    assert shown["dotfiles_state"] == "ok", shown
    assert "moved the existing ~/.dotfiles" in shown["dotfiles_log"], shown
    ok(d, ref, f"test -x {home}/.dotfiles-backup/.dotfiles/install.sh", user="root")
    ok(d, ref, f"test -e {home}/.den-dotfiles-marker", user="root")


def test_image_without_git(
    pool_daemon: Daemon, bb_image: str, users: Users, server: Server
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "nogit", image=bb_image, dotfiles=server.url("install"))
    shown = settled(d, ws["ref"])
    assert shown["state"] == "running" and shown["dotfiles_state"] == "failed", shown
    assert "git is not installed" in shown["dotfiles_log"], shown


BAD = [
    "file:///srv/git/org/dots.git",
    "/srv/git/org/dots.git",
    "./org/dots",
    "dots",
    "ext::sh -c touch% /tmp/x",
    "https://host/org/dots;rm",
    "-uhttps://host/org/dots",
    "ftp://host/org/dots",
    "https://us$er:tok@host/org/dots",
    "ssh://-oProxyCommand@host/org/dots",
]


@pytest.mark.parametrize("url", BAD)
def test_bad_urls_are_refused_at_the_call(pool_daemon: Daemon, users: Users, url: str) -> None:
    d = pool_daemon
    owner = users.make()
    invalid(d, "workspace.create", "dotfiles", name="bad", user=owner, dotfiles=url)
    assert d.call("workspace.list", user=owner) == []
    invalid(d, "user.update", "dotfiles", name=owner, dotfiles=url)
    invalid(d, "user.create", "dotfiles", name=f"{owner}x", dotfiles=url)
    assert d.call("user.get", name=owner)["dotfiles_url"] == ""


def test_dotfiles_without_a_repository_is_refused(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "none")
    assert ws["dotfiles_state"] == ""
    msg = invalid(d, "workspace.dotfiles", "url", ref=ws["ref"])
    assert "--dotfiles" in msg
