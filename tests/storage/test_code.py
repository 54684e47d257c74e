"""The code tree: clone, list, reorganize, changes and push against bare repos on disk.

RPC tests run against the session's daemon on a real btrfs pool; the pure
tree operations of :mod:`den.storage.code` are also called directly on plain
directories (changes and push need no workspace there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from den import proc
from den.errors import BackendFailure, Conflict, NotFound
from den.storage import code
from den.storage import git as gitrun
from tests.conftest import Daemon
from tests.helpers.outside import outside_host

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Tess Ter",
    "GIT_AUTHOR_EMAIL": "tess@example.org",
    "GIT_COMMITTER_NAME": "Tess Ter",
    "GIT_COMMITTER_EMAIL": "tess@example.org",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}
PWNED = Path("/tmp/pwned")
INVALID_PARAMS, NOT_FOUND, CONFLICT, FORBIDDEN, BACKEND = -32602, -32001, -32002, -32003, -32005


def git(*args: str, cwd: Path | None = None) -> str:
    res = subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, f"git {' '.join(args)}: {res.stderr}"
    return res.stdout.strip()


@dataclass
class Remote:
    """A bare repo at SCRATCH/srv/ORG/REPO.git and a working clone that pushes to it."""

    bare: Path
    work: Path
    org: str
    repo: str

    @property
    def rel(self) -> str:
        return f"local/{self.org}/{self.repo}"

    def commit(self, name: str, text: str, push: bool = True) -> str:
        (self.work / name).write_text(text)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", f"add {name}", cwd=self.work)
        if push:
            git("push", "-q", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def log(self) -> list[str]:
        return git("--git-dir", str(self.bare), "log", "--format=%s|%an|%cn", "main").splitlines()


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="den-code-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_remote(scratch: Path, repo: str = "repo") -> Remote:
    org = f"org-{secrets.token_hex(3)}"
    bare = scratch / "srv" / org / f"{repo}.git"
    bare.parent.mkdir(parents=True)
    git("init", "-q", "--bare", "-b", "main", str(bare))
    work = scratch / f"work-{org}-{repo}"
    git("clone", "-q", str(bare), str(work))
    git("checkout", "-q", "-b", "main", cwd=work)
    r = Remote(bare, work, org, repo)
    (work / "README").write_text("hello\n")
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    git("push", "-q", "-u", "origin", "main", cwd=work)
    return r


def code_dir(d: Daemon) -> Path:
    return d.data_dir / "pool" / "code"


def tree_entries(root: Path) -> set[str]:
    """Every path down to the repo level, hidden ones included."""
    out: set[str] = set()
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if len(rel.parts) >= 3:
            dirs[:] = []
        out.update(str(rel / n) for n in [*dirs, *files])
    return out


@pytest.fixture
def shared(pool_daemon: Daemon) -> Iterator[list[str]]:
    """Paths (relative to the shared tree) a test made there; removed afterwards."""
    made: list[str] = []
    yield made
    for rel in made:
        shutil.rmtree(code_dir(pool_daemon) / rel, ignore_errors=True)


def audit(d: Daemon, **params: Any) -> list[dict[str, Any]]:
    c = d.client()
    try:
        result: list[dict[str, Any]] = c.call("audit.list", params)
        return result
    finally:
        c.close()


def by_path(rows: list[dict[str, Any]], key: str = "path") -> dict[str, dict[str, Any]]:
    return {r[key]: r for r in rows}


# -- clone and list ----------------------------------------------------------------


def test_clone_path_and_file_url_land_at_the_conventional_place(
    pool_daemon: Daemon, scratch: Path, shared: list[str]
) -> None:
    r1, r2 = make_remote(scratch), make_remote(scratch, "tool")
    shared += [f"local/{r1.org}", f"local/{r2.org}"]

    res = pool_daemon.cli("code", "clone", str(r1.bare))
    assert res.returncode == 0, res.stderr
    assert (code_dir(pool_daemon) / r1.rel / ".git").is_dir()
    assert (code_dir(pool_daemon) / r1.rel / "README").read_text() == "hello\n"

    out = pool_daemon.call("code.clone", url=f"file://{r2.bare}")
    assert out == {
        "path": r2.rel,
        "branch": "main",
        "upstream": "origin/main",
        "remote": f"file://{r2.bare}",
        "ahead": 0,
        "behind": 0,
        "dirty": False,
    }

    res = pool_daemon.cli("code", "ls", "--json")
    assert res.returncode == 0, res.stderr
    rows = by_path(json.loads(res.stdout))
    assert rows[r1.rel]["remote"] == str(r1.bare)
    assert rows[r1.rel]["branch"] == "main"
    assert (rows[r1.rel]["ahead"], rows[r1.rel]["behind"], rows[r1.rel]["dirty"]) == (0, 0, False)
    assert r2.rel in rows

    table = pool_daemon.cli("code", "ls")
    assert table.returncode == 0 and r1.rel in table.stdout

    err = pool_daemon.error("code.clone", url=str(r1.bare))
    assert err.code == CONFLICT and "exists already" in err.message
    assert not [n for n in os.listdir(code_dir(pool_daemon)) if n.startswith(".den-clone-")]

    events = audit(pool_daemon, method="code.clone", target=f"code:{r2.rel}")
    assert events and events[0]["outcome"] == "ok"


def test_list_shows_ahead_behind_and_dirty(
    pool_daemon: Daemon, scratch: Path, shared: list[str]
) -> None:
    r = make_remote(scratch)
    shared.append(f"local/{r.org}")
    pool_daemon.call("code.clone", url=str(r.bare))
    repo = code_dir(pool_daemon) / r.rel

    (repo / "local.txt").write_text("mine\n")  # one commit ahead
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "local work", cwd=repo)
    r.commit("upstream.txt", "theirs\n")  # one commit behind, once fetched
    git("fetch", "-q", cwd=repo)
    rows = by_path(pool_daemon.call("code.list"))
    assert (rows[r.rel]["ahead"], rows[r.rel]["behind"], rows[r.rel]["dirty"]) == (1, 1, False)

    (repo / "README").write_text("changed\n")
    rows = by_path(json.loads(pool_daemon.cli("code", "ls", "--json", check=True).stdout))
    assert rows[r.rel]["dirty"] is True
    assert rows[r.rel]["upstream"] == "origin/main"

    git("checkout", "-q", "--detach", cwd=repo)
    rows = by_path(pool_daemon.call("code.list"))
    assert rows[r.rel]["branch"] is None
    assert rows[r.rel]["ahead"] is None


# -- reorganize -----------------------------------------------------------------------


def test_reorganize_dry_run_then_apply(
    pool_daemon: Daemon, scratch: Path, shared: list[str]
) -> None:
    root = code_dir(pool_daemon)
    tag = secrets.token_hex(3)
    r1, r2, r3 = make_remote(scratch), make_remote(scratch), make_remote(scratch)
    shared += [f"local/{r.org}" for r in (r1, r2, r3)]
    shared += [f"misplaced-{tag}", f"wrong-{tag}", f"dup-{tag}"]
    pool_daemon.call("code.clone", url=str(r3.bare))
    git("clone", "-q", str(r1.bare), str(root / f"misplaced-{tag}" / "repo"))  # two levels
    git("clone", "-q", str(r2.bare), str(root / f"wrong-{tag}" / "o" / "r"))  # three levels
    git("clone", "-q", str(r3.bare), str(root / f"dup-{tag}" / "o" / "r"))  # target taken
    before = tree_entries(root)

    res = pool_daemon.cli("code", "reorganize", "--json")
    assert res.returncode == 0, res.stderr
    plan = by_path(json.loads(res.stdout), "source")
    assert plan[f"misplaced-{tag}/repo"]["target"] == r1.rel
    assert plan[f"misplaced-{tag}/repo"]["status"] == "planned"
    assert plan[f"wrong-{tag}/o/r"] == {
        "source": f"wrong-{tag}/o/r", "target": r2.rel, "status": "planned", "reason": ""
    }  # fmt: skip
    assert plan[f"dup-{tag}/o/r"]["status"] == "refused"
    assert "exists" in plan[f"dup-{tag}/o/r"]["reason"]
    assert r3.rel not in plan  # already in place
    assert tree_entries(root) == before  # a dry run changes nothing

    moves = by_path(pool_daemon.call("code.reorganize", apply=True), "source")
    assert moves[f"misplaced-{tag}/repo"]["status"] == "moved"
    assert moves[f"wrong-{tag}/o/r"]["status"] == "moved"
    assert moves[f"dup-{tag}/o/r"]["status"] == "refused"
    assert (root / r1.rel / ".git").is_dir() and (root / r2.rel / ".git").is_dir()
    assert not (root / f"misplaced-{tag}").exists()  # emptied parents are removed
    assert not (root / f"wrong-{tag}").exists()
    assert (root / f"dup-{tag}" / "o" / "r" / ".git").is_dir()
    rows = by_path(pool_daemon.call("code.list"))
    assert rows[r2.rel]["remote"] == str(r2.bare)

    again = by_path(pool_daemon.call("code.reorganize"), "source")
    assert set(again) & {f"misplaced-{tag}/repo", f"wrong-{tag}/o/r"} == set()


def test_members_may_list_but_not_change_the_shared_tree(
    pool_daemon: Daemon, scratch: Path, name: str
) -> None:
    pool_daemon.call("user.create", name=name)
    r = make_remote(scratch)
    resp = pool_daemon.call_as(name, "code.clone", {"url": str(r.bare)})
    assert resp["error"]["code"] == FORBIDDEN
    resp = pool_daemon.call_as(name, "code.reorganize", {"apply": True})
    assert resp["error"]["code"] == FORBIDDEN
    assert isinstance(pool_daemon.call_as(name, "code.list", {})["result"], list)
    assert not (code_dir(pool_daemon) / r.rel).exists()


# -- bad input ---------------------------------------------------------------------------

BAD_URLS = [
    "x;rm -rf /",
    "$(touch /tmp/pwned)",
    "`touch /tmp/pwned`",
    "/srv/org/repo;touch /tmp/pwned",
    "--upload-pack=touch /tmp/pwned",
    "-u",
    "ext::sh -c touch% /tmp/pwned",
    "ext::sh",
    "fd::17",
    "https://example.org/org/../repo",
    "/srv/../repo",
    "file:///srv/org/../../repo",
    "https://example.org//repo",
    "relative/org/repo",
    "https://user:secret@example.org/org/repo",
    "foo://example.org/org/repo",
    "https://example.org/repo",
    "file://elsewhere/srv/org/repo",
    "https://example.org/org/repo\n",
    "https://example.org/org/re\x00po",
    "",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_urls_are_refused_and_nothing_is_made(pool_daemon: Daemon, url: str) -> None:
    PWNED.unlink(missing_ok=True)
    root = code_dir(pool_daemon)
    before = tree_entries(root)
    err = pool_daemon.error("code.clone", url=url)
    assert err.code == INVALID_PARAMS, err.message
    (problem,) = err.data["errors"]
    assert problem["field"] == "url" and problem["message"]
    assert tree_entries(root) == before
    assert not PWNED.exists()


def test_cli_refuses_shell_metacharacters(pool_daemon: Daemon) -> None:
    PWNED.unlink(missing_ok=True)
    res = pool_daemon.cli("code", "clone", "x;touch /tmp/pwned")
    assert res.returncode != 0
    assert "shell metacharacters" in res.stderr
    assert not PWNED.exists()


def test_failed_clone_leaves_nothing(pool_daemon: Daemon, scratch: Path) -> None:
    root = code_dir(pool_daemon)
    before = tree_entries(root)
    org = f"org-{secrets.token_hex(3)}"
    err = pool_daemon.error("code.clone", url=f"{scratch}/{org}/missing.git")
    assert err.code == BACKEND and "git clone failed" in err.message
    broken = scratch / "srv" / org / "broken.git"  # exists, but is no repository
    broken.mkdir(parents=True)
    (broken / "HEAD").write_text("garbage")
    err = pool_daemon.error("code.clone", url=str(broken))
    assert err.code == BACKEND
    assert tree_entries(root) == before


def test_workspace_and_repo_refs_are_checked(pool_daemon: Daemon, name: str) -> None:
    err = pool_daemon.error("code.changes", workspace="nobody-here/ws")
    assert err.code == NOT_FOUND
    err = pool_daemon.error("code.changes", workspace="ws")  # root owns no workspaces
    assert err.code == INVALID_PARAMS
    err = pool_daemon.error("code.changes", workspace="../../etc")
    assert err.code == INVALID_PARAMS
    for repo in ("../../etc/passwd", "local/../x/y", "local/org", "/etc/x/y", "a/b/c/d", "a//b"):
        err = pool_daemon.error("code.push", workspace="x/ws", repo=repo, message="m")
        assert err.code == INVALID_PARAMS, repo
        assert err.data["errors"][0]["field"] == "repo"
    pool_daemon.call("user.create", name=name)
    resp = pool_daemon.call_as(name, "code.changes", {"workspace": "root-owner/ws"})
    assert resp["error"]["code"] == NOT_FOUND
    resp = pool_daemon.call_as(name, "code.push", {"workspace": "ws", "message": "m"})
    assert resp["error"]["code"] == NOT_FOUND


def is_mount(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def test_code_mount_is_bound_at_start_and_again_after_restart(pool_daemon: Daemon) -> None:
    from tests.conftest import make_base

    base = make_base()
    d = Daemon(base)
    mount = base / "code-mount"
    d.env["DEN_CODE_MOUNT"] = str(mount)
    try:
        d.start()
        assert is_mount(mount)
        tree = d.data_dir / "pool" / "code"
        (tree / "marker").write_text("x")
        assert (mount / "marker").read_text() == "x"
        d.restart()  # mounted already: left as it is
        assert is_mount(mount)
        with open("/proc/self/mountinfo") as f:
            assert sum(1 for ln in f if f" {mount} " in ln) == 1
    finally:
        d.cleanup()
        subprocess.run(["umount", "--lazy", str(mount)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_mount_refuses_a_non_empty_directory(scratch: Path) -> None:
    tree, mount = scratch / "tree", scratch / "mnt"
    tree.mkdir()
    mount.mkdir()
    (mount / "old-repo").mkdir()
    with pytest.raises(BackendFailure, match="not empty"):
        asyncio.run(code.ensure_mount(tree, mount))
    assert not is_mount(mount)


# -- changes and push, on a tree of the test's own ---------------------------------------


@pytest.fixture
def tree(scratch: Path) -> Path:
    t = scratch / "tree"
    t.mkdir()
    return t


def _clone(tree: Path, r: Remote) -> Path:
    asyncio.run(code.clone(tree, str(r.bare)))
    return tree / r.rel


ME = code.Identity("Alice Dev", "alice@den.test")
ROOT = code.Identity("root", "root@den.test")


def _push(tree: Path, rel: str, message: str) -> code.Pushed:
    """code.push with git run in the test's own tree (in a workspace it runs inside)."""

    async def run(args: list[str], stdin: bytes, env: dict[str, str]) -> proc.Result:
        return await gitrun.run(*args, repo=tree / rel, input=stdin, extra_env=env, check=False)

    return asyncio.run(code.push(run, rel, message, author=ME, committer=ROOT))


def test_changes_and_push(scratch: Path, tree: Path) -> None:
    r, quiet = make_remote(scratch), make_remote(scratch)
    repo = _clone(tree, r)
    _clone(tree, quiet)
    assert asyncio.run(code.changes(tree)) == []

    (repo / "README").write_text("edited\n")
    (repo / "new.txt").write_text("new\n")
    (changed,) = asyncio.run(code.changes(tree))
    assert changed.path == r.rel and changed.dirty and changed.unpushed == 0
    assert sorted(changed.files) == ["README", "new.txt"]

    pushed = _push(tree, r.rel, "work from the workspace\n\nwith a body")
    assert pushed.commit is not None and pushed.commits == 1 and pushed.ref == "refs/heads/main"
    assert r.log()[0] == "work from the workspace|Alice Dev|root"
    assert asyncio.run(code.changes(tree)) == []

    # A commit made in the workspace and not pushed yet counts too.
    (repo / "more.txt").write_text("more\n")
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "committed inside", cwd=repo)
    (ahead,) = asyncio.run(code.changes(tree))
    assert ahead.unpushed == 1 and not ahead.dirty
    pushed = _push(tree, r.rel, "unused")
    assert pushed.commit is None and pushed.commits == 1
    assert r.log()[0].startswith("committed inside|")

    with pytest.raises(Conflict, match="nothing to commit or push"):
        _push(tree, r.rel, "again")


def test_push_errors(scratch: Path, tree: Path) -> None:
    r = make_remote(scratch)
    repo = _clone(tree, r)
    with pytest.raises(NotFound):
        _push(tree, f"local/{r.org}/nope", "m")

    (repo / "a.txt").write_text("a\n")
    r.commit("theirs.txt", "theirs\n")  # the remote moves on: the push is rejected
    with pytest.raises(Conflict, match="rejected") as info:
        _push(tree, r.rel, "mine")
    assert "stays in the workspace" in str(info.value)
    assert git("log", "-1", "--format=%s", cwd=repo) == "mine"  # committed, not lost

    git("remote", "remove", "origin", cwd=repo)
    with pytest.raises(Conflict, match="no remote"):
        _push(tree, r.rel, "m")


def test_workspace_repos_cannot_make_root_run_programs(scratch: Path, tree: Path) -> None:
    r = make_remote(scratch)
    repo = _clone(tree, r)
    ran = scratch / "ran"
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text(f"#!/bin/sh\ntouch {ran}\n")
    hook.chmod(0o755)
    (repo / "x.txt").write_text("x\n")
    _push(tree, r.rel, "hooks do not run")
    assert not ran.exists()

    for key, value in (
        ("core.fsmonitor", f"touch {ran}"),
        ("filter.x.clean", f"touch {ran}"),
        ("core.sshCommand", f"touch {ran}"),
        ("include.path", "/nonexistent/den-include"),
    ):
        git("config", key, value, cwd=repo)
        (repo / ".gitattributes").write_text("* filter=x\n")
        (state,) = asyncio.run(code.changes(tree))
        assert state.problem is not None and key.lower() in state.problem, (key, state)
        git("config", "--file", ".git/config", "--unset", key, cwd=repo)
        (repo / ".gitattributes").unlink()
    assert not ran.exists()

    # A FIFO in .git would make git wait: refused before git runs.
    fifo = repo / ".git" / "info" / "exclude"
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    (state,) = asyncio.run(asyncio.wait_for(code.changes(tree), 10))
    assert state.problem is not None and "neither a file nor a directory" in state.problem
    fifo.unlink()

    # A config that is a symlink is refused before it is read (it could be any host file).
    (repo / ".git" / "config").rename(repo / ".git" / "config.real")
    (repo / ".git" / "config").symlink_to(repo / ".git" / "config.real")
    (state,) = asyncio.run(code.changes(tree))
    assert state.problem is not None and "symlink" in state.problem
    assert not ran.exists()


def test_symlinked_repos_are_not_followed(scratch: Path, tree: Path) -> None:
    r = make_remote(scratch)
    (tree / "local" / "elsewhere").mkdir(parents=True)
    (tree / "local" / "elsewhere" / "repo").symlink_to(r.work)
    (r.work / "dirty.txt").write_text("dirty\n")
    assert asyncio.run(code.changes(tree)) == []


# -- per workspace, through the daemon ------------------------------------------------------


def _has_workspaces() -> bool:
    from den.rpc.registry import REGISTRY
    from den.services import load_all

    load_all()
    return "workspace.create" in REGISTRY.methods


@pytest.fixture
def workspace(
    pool_daemon: Daemon, name: str, request: pytest.FixtureRequest
) -> Iterator[dict[str, Any]]:
    """A member and a way to make their workspace ``code`` (after the test cloned its repos)."""
    if not _has_workspaces():
        pytest.skip("workspace.create is not registered (src/den/services/workspaces.py missing)")
    image = request.getfixturevalue("base_image")["name"]
    pool_daemon.call("user.create", name=name)
    made: list[str] = []

    def create() -> dict[str, Any]:
        ws: dict[str, Any] = pool_daemon.call(
            "workspace.create", name="code", user=name, image=image
        )
        made.append(ws["ref"])
        return ws

    yield {"owner": name, "create": create}
    for ref in made:
        pool_daemon.call("workspace.delete", ref=ref)


@contextlib.contextmanager
def git_server(scratch: Path) -> Iterator[str]:
    """``git daemon`` serving SCRATCH/srv (pushes allowed) on an outside host; its URL."""
    with outside_host() as host:
        srv = scratch / "srv"
        srv.mkdir(exist_ok=True)
        daemon = host.start(
            [
                "git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack",
                f"--base-path={srv}", f"--listen={host.address}", "--port=9418", str(srv),
            ],
            scratch / "git-daemon.log",
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection((host.address, 9418), timeout=1).close()
                break
            except OSError:
                assert daemon.poll() is None and time.monotonic() < deadline, "no git daemon"
                time.sleep(0.1)
        url = f"git://{host.address}"
        yield url


def _served_repo(d: Daemon, scratch: Path, url: str, shared: list[str]) -> tuple[Remote, str]:
    """A remote served by the git server, cloned into the shared tree over git://."""
    r = make_remote(scratch)
    res = d.call("code.clone", url=f"{url}/{r.org}/{r.repo}.git")
    shared.append(res["path"].rsplit("/", 1)[0])
    return r, str(res["path"])


def _exec(d: Daemon, ref: str, script: str, user: str | None = None) -> str:
    """``script`` as the owner's account inside (the shared tree's repositories are its own
    there: /code is mapped to it)."""
    params = {"ref": ref, "argv": ["sh", "-c", script], "timeout": 60}
    res = (
        d.call_as(user, "workspace.exec", params)["result"]
        if user
        else d.call("workspace.exec", **params)
    )
    assert res["exit_code"] == 0, res
    return str(res["stdout"])


def test_workspace_changes_and_push(
    pool_daemon: Daemon, scratch: Path, shared: list[str], workspace: dict[str, Any], name: str
) -> None:
    """Changes are read from a frozen snapshot; the push runs git inside the workspace,
    over the workspace's own network, to a git server outside this machine's namespaces."""
    with git_server(scratch) as url:
        r, rel = _served_repo(pool_daemon, scratch, url, shared)
        ws = workspace["create"]()
        owner = workspace["owner"]
        snap = pool_daemon.data_dir / "pool" / "volumes" / ws["id"] / "code"
        shared_repo = code_dir(pool_daemon) / rel
        head_before = git("rev-parse", "HEAD", cwd=shared_repo)

        (snap / rel / "README").write_text("from the workspace\n")
        (snap / rel / "only-here.txt").write_text("x\n")
        assert not (shared_repo / "only-here.txt").exists()  # the snapshot is independent

        resp = pool_daemon.call_as(owner, "code.changes", {"workspace": "code"})
        (row,) = [c for c in resp["result"] if c["path"] == rel]
        assert row["dirty"] and sorted(row["files"]) == ["README", "only-here.txt"]
        assert row["remote"] == f"{url}/{r.org}/{r.repo}.git"
        res = pool_daemon.cli("code", "changes", f"{owner}/code", "--json", check=True)
        assert rel in {c["path"] for c in json.loads(res.stdout)}
        # Reading changed nothing in the workspace's repo and left no snapshot behind.
        assert not (snap / rel / ".git" / "index.lock").exists()
        assert list((pool_daemon.data_dir / "pool" / "frozen").iterdir()) == []

        res = pool_daemon.cli(
            "code", "push", "code", "--repo", rel, "--message", "from den", user=owner
        )
        assert res.returncode == 0, res.stderr
        subject, author, committer = r.log()[0].split("|")
        assert subject == "from den" and author == owner and committer == owner
        assert git("rev-parse", "HEAD", cwd=shared_repo) == head_before
        assert (shared_repo / "README").read_text() == "hello\n"
        assert pool_daemon.call("code.changes", workspace=f"{owner}/code") == []
        # The commit was made inside: the workspace's own git sees it.
        log = _exec(pool_daemon, ws["ref"], f"git -C /code/{rel} log -1 --format=%s")
        assert log == "from den\n"

        (snap / rel / "second.txt").write_text("2\n")  # the only repo with changes: no --repo
        out = pool_daemon.call("code.push", workspace=f"{owner}/code", message="second")
        assert (out["repo"], out["commits"], out["ref"]) == (rel, 1, "refs/heads/main")
        assert r.log()[0] == f"second|{owner}|root"  # an admin pushing: the committer

        err = pool_daemon.error("code.push", workspace=f"{owner}/code", repo=rel, message="m")
        assert err.code == CONFLICT and "nothing to commit" in err.message
        err = pool_daemon.error(
            "code.push", workspace=f"{owner}/code", repo="local/no/such", message="m"
        )
        assert err.code == NOT_FOUND
        events = audit(pool_daemon, method="code.push", target=f"code:{owner}/code:{rel}")
        assert [e["outcome"] for e in events][-1] == "ok"

        # The remote moves on: the push is refused, and the commit stays in the workspace.
        git("pull", "-q", "--ff-only", cwd=r.work)
        r.commit("theirs.txt", "theirs\n")
        (snap / rel / "third.txt").write_text("3\n")
        err = pool_daemon.error("code.push", workspace=f"{owner}/code", message="third")
        assert err.code == CONFLICT and "stays in the workspace" in err.message
        log = _exec(pool_daemon, ws["ref"], f"git -C /code/{rel} log -1 --format=%s")
        assert log == "third\n"


RACER = r"""
cd /code/{rel}/.git
cp config config.good
{{ cat config.good; printf '[filter "x"]\n\tclean = touch {mark}\n\tsmudge = touch {mark}\n'
  printf '[core]\n\tfsmonitor = touch {mark}\n\tsshCommand = touch {mark}\n'
  printf '[include]\n\tpath = /etc/passwd\n'; }} > config.bad
echo '* filter=x' > ../.gitattributes
end=$(( $(date +%s) + 300 )); i=0
while [ "$(date +%s)" -lt "$end" ]; do
  cp config.bad config.new && mv config.new config
  for f in COMMIT_EDITMSG index.lock ORIG_HEAD FETCH_HEAD HEAD.lock refs/heads/main.lock            logs/HEAD packed-refs.lock; do
    ln -sfn {victim} "$f" 2>/dev/null
  done
  echo "$i" > ../race-$((i % 3)).txt; i=$((i + 1))
  cp config.good config.new && mv config.new config
  rm -f COMMIT_EDITMSG index.lock HEAD.lock refs/heads/main.lock packed-refs.lock
done
"""


@pytest.mark.slow
def test_a_racing_workspace_cannot_run_or_write_on_the_host(
    pool_daemon: Daemon, scratch: Path, shared: list[str], workspace: dict[str, Any], name: str
) -> None:
    """The workspace swaps a program-running .git/config in and out and plants symlinks to a
    host path at every place git writes, while code.changes and code.push run 50 times:
    nothing runs and nothing is written on the host."""
    tag = secrets.token_hex(4)
    mark, victim = Path(f"/tmp/den-pwned-{tag}"), Path(f"/tmp/den-victim-{tag}")
    with git_server(scratch) as url:
        _r, rel = _served_repo(pool_daemon, scratch, url, shared)
        ws = workspace["create"]()
        owner = workspace["owner"]
        racer = RACER.format(rel=rel, mark=mark, victim=victim)
        _exec(pool_daemon, ws["ref"], f"cat > /tmp/racer.sh <<'EOF'\n{racer}\nEOF\n")
        _exec(
            pool_daemon,
            ws["ref"],
            "setsid sh /tmp/racer.sh </dev/null >/dev/null 2>&1 & echo $! >/tmp/racer.pid",
        )
        problems, outcomes = 0, set()
        try:
            for _ in range(50):
                resp = pool_daemon.call_as(owner, "code.changes", {"workspace": "code"})
                assert "result" in resp, resp
                problems += sum(1 for c in resp["result"] if c["problem"])
                resp = pool_daemon.call_as(
                    owner, "code.push", {"workspace": "code", "repo": rel, "message": "race"}
                )
                outcomes.add(resp["error"]["code"] if "error" in resp else "ok")
                assert not mark.exists() and not os.path.lexists(victim)
        finally:
            _exec(pool_daemon, ws["ref"], "kill $(cat /tmp/racer.pid) || true")
            mark.unlink(missing_ok=True)
            victim.unlink(missing_ok=True)
        assert problems > 0  # the frozen snapshot caught the hostile config at least once
        assert -32603 not in outcomes, outcomes  # refused or failed cleanly, never internal


def test_members_see_only_their_own_workspaces(
    pool_daemon: Daemon, workspace: dict[str, Any], name: str
) -> None:
    ws = workspace["create"]()
    other = f"{name[:20]}-b"
    pool_daemon.call("user.create", name=other)
    mine = pool_daemon.call_as(workspace["owner"], "code.changes", {"workspace": "code"})
    assert "result" in mine
    theirs = pool_daemon.call_as(other, "code.changes", {"workspace": ws["ref"]})
    unknown = pool_daemon.call_as(
        other, "code.changes", {"workspace": f"{workspace['owner']}/nope"}
    )
    assert theirs["error"]["code"] == unknown["error"]["code"] == NOT_FOUND
    pool_daemon.call("user.delete", name=other)
