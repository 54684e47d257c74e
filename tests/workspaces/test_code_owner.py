"""/code is the owner's account's inside, at no per-workspace cost.

The shared code tree is cloned on the host as root, so a workspace's snapshot
of it is root's on disk. A workspace made with the owner's account (uid 1000)
sees its /code through an idmap that trades on-disk 0 and 1000: the tree is the
account's inside, and what the account writes is stored as root's, as the host
expects. Workspaces made before (no flag) and images that cannot hold the
account keep the plain map. A copy (``den cp``) keeps its source's map.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.ssh.conftest import person
from tests.storage.conftest import debian_image_as
from tests.storage.test_code import (  # noqa: F401  (scratch and shared are fixtures)
    code_dir,
    make_remote,
    scratch,
    shared,
)
from tests.workspaces.conftest import Users, create, make_users, ok, own_daemon, sh

CODE_OWNER = "code_owner"  # its key in a workspace's backend_state


@pytest.fixture
def repo(pool_daemon: Daemon, scratch: Path, shared: list[str]) -> Iterator[str]:  # noqa: F811
    """A repository cloned into the shared tree by den (as root on the host); its path."""
    r = make_remote(scratch)
    res = pool_daemon.call("code.clone", url=str(r.bare))
    shared.append(str(res["path"]).rsplit("/", 1)[0])
    assert (code_dir(pool_daemon) / res["path"] / ".git").stat().st_uid == 0
    yield str(res["path"])


def snapshot(d: Daemon, ws: dict[str, Any]) -> Path:
    """The workspace's code snapshot on the host (read-only inspection)."""
    return Path(d.data_dir) / "pool" / "volumes" / str(ws["id"]) / "code"


def backend_state(d: Daemon, ws_id: str) -> dict[str, Any]:
    db = sqlite3.connect(d.data_dir / "den.db")
    try:
        (raw,) = db.execute(
            "SELECT backend_state FROM workspaces WHERE id = ?", (ws_id,)
        ).fetchone()
    finally:
        db.close()
    state: dict[str, Any] = json.loads(raw) if isinstance(raw, str) else raw
    return state


def test_code_is_the_owners_and_stored_as_roots(
    pool_daemon: Daemon, debian_image: str, users: Users, repo: str
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "code", image=debian_image)
    ref, path = ws["ref"], f"/code/{repo}"
    assert backend_state(d, ws["id"])[CODE_OWNER] == 1000
    # den's clone (root's on disk) is the account's inside, and the account is
    # the default user: git works there without sudo or safe.directory.
    assert ok(d, ref, f"stat -c '%u:%g %U' {path} {path}/.git {path}/README") == (
        f"1000:1000 {owner}\n" * 3
    )
    out = ok(
        d,
        ref,
        f"cd {path} && id -u && echo mine > mine.txt && git add mine.txt && "
        "git commit -q -m 'by the account' && git log -1 --format=%s",
    )
    assert out == "1000\nby the account\n"
    ok(d, ref, "mkdir -p /code/local/new/repo && echo ok > /code/local/new/x")
    # What the account wrote is root's on disk, like the rest of the tree.
    snap = snapshot(d, ws)
    for rel in (f"{repo}/mine.txt", f"{repo}/.git/index", "local/new/repo", "local/new/x"):
        st = (snap / rel).stat()
        assert (st.st_uid, st.st_gid) == (0, 0), rel
    # Root inside sees what it makes as its own; on disk it is the account's id.
    assert ok(d, ref, f"touch {path}/by-root && stat -c %u:%g {path}/by-root", user="root") == (
        "0:0\n"
    )
    assert ok(d, ref, f"stat -c %U {path}/by-root") == "root\n"
    st = (snap / repo / "by-root").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    # The rootfs keeps its plain map: root's files are root's.
    assert ok(d, ref, "stat -c %u:%g /etc/passwd /root") == "0:0\n0:0\n"
    # The host reads the changes whatever the ids: the commit and the root-made file.
    (row,) = [c for c in d.call("code.changes", workspace=ref) if c["path"] == repo]
    assert row["files"] == ["by-root"] and row["unpushed"] == 1 and row["problem"] is None


def test_code_push_runs_as_the_repositorys_owner(
    pool_daemon: Daemon, debian_image: str, users: Users, repo: str
) -> None:
    """code.push commits and pushes as the account (git's owner check passes with no
    exception configured), to a remote inside the workspace made by the account."""
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "push", image=debian_image)
    ref, path = ws["ref"], f"/code/{repo}"
    ok(
        d,
        ref,
        f"git clone -q --bare {path} ~/up.git && git -C {path} remote set-url origin ~/up.git",
    )
    ok(d, ref, f"git -C {path} fetch -q origin && echo change >> {path}/README")
    out = d.call("code.push", workspace=ref, repo=repo, message="pushed by den")
    assert out["commits"] == 1 and out["commit"]
    log = ok(d, ref, "git --git-dir ~/up.git log -1 --format='%s %an'")
    assert log == f"pushed by den {owner}\n"
    assert ok(d, ref, f"stat -c %U {path}/.git/index {path}/.git/logs/HEAD") == f"{owner}\n" * 2


def test_sftp_writes_code_as_the_owner(
    pool_daemon: Daemon, debian_image: str, users: Users, repo: str, tmp_path: Path
) -> None:
    """den's own sftp server (minbase has none) joins the workspace as the account:
    /code is writable over sftp, and the files are root's on disk."""
    d = pool_daemon
    alice = person(d, users, tmp_path)
    ws = create(d, alice.name, "sftp", image=debian_image)
    f = tmp_path / "up.txt"
    f.write_text("up\n")
    res = alice.sftp("sftp", f"put {f} /code/{repo}/up.txt\nmkdir /code/{repo}/dir\n")
    assert res.returncode == 0, res.stderr
    out = ok(d, ws["ref"], f"stat -c '%U %u' /code/{repo}/up.txt /code/{repo}/dir")
    assert out == f"{alice.name} 1000\n{alice.name} 1000\n"
    for rel in ("up.txt", "dir"):
        assert (snapshot(d, ws) / repo / rel).stat().st_uid == 0


def test_copies_keep_their_sources_map(
    pool_daemon: Daemon, debian_image: str, users: Users, repo: str
) -> None:
    """den cp of a workspace with the swap keeps it; den cp of one made before den
    had accounts (no flag: simulated by clearing it) keeps the plain map, where den's
    clone is root's and the account cannot write it, as before."""
    d = pool_daemon
    owner = users.make()
    src = create(d, owner, "src", image=debian_image)
    ok(d, src["ref"], f"echo kept > /code/{repo}/kept.txt")
    d.call("workspace.stop", ref=src["ref"])

    copy = d.call_as(owner, "workspace.clone", {"source": "src", "name": "copy"})["result"]
    assert backend_state(d, copy["id"])[CODE_OWNER] == 1000
    out = ok(d, copy["ref"], f"stat -c %u /code/{repo} /code/{repo}/kept.txt; id -u")
    assert out == "1000\n1000\n1000\n"
    ok(d, copy["ref"], f"echo more >> /code/{repo}/kept.txt")

    db = sqlite3.connect(d.data_dir / "den.db")
    try:
        db.execute(
            "UPDATE workspaces SET backend_state = json_remove(backend_state, '$.code_owner') "
            "WHERE id = ?",
            (src["id"],),
        )
        db.commit()
    finally:
        db.close()
    old = d.call_as(owner, "workspace.clone", {"source": "src", "name": "old"})["result"]
    assert CODE_OWNER not in backend_state(d, old["id"])
    ref = old["ref"]
    assert ok(d, ref, "id -u") == "1000\n"  # the account is made all the same
    out = ok(d, ref, f"stat -c %u:%g /code/{repo} /code/{repo}/kept.txt")
    assert out == "0:0\n0:0\n"
    res = sh(d, ref, f"touch /code/{repo}/x")
    assert res["exit_code"] != 0 and "Permission denied" in res["stderr"]
    ok(d, ref, f"touch /code/{repo}/x && stat -c %u /code/{repo}/x", user="root")
    assert (snapshot(d, old) / repo / "x").stat().st_uid == 0


def test_no_account_no_swap(pool_daemon: Daemon, bb_image: str, users: Users, repo: str) -> None:
    """The busybox image cannot hold the account (its uid 1000 is dev, and it has no
    usermod): sessions land as root, and /code stays root's, as before."""
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "bb", image=bb_image)
    assert CODE_OWNER not in backend_state(d, ws["id"])
    assert ok(d, ws["ref"], f"id -u; stat -c %u:%g /code/{repo}; touch /code/{repo}/r") == (
        "0\n0:0\n"
    )
    assert (snapshot(d, ws) / repo / "r").stat().st_uid == 0


def test_sessions_as_root_keep_code_roots() -> None:
    """ssh_user = root (everyone lands as root, as before den made accounts): /code
    stays root's, though the image could hold the account."""
    with own_daemon({"DEN_SSH_USER": "root"}) as d, make_users(d) as users:
        image = str(debian_image_as(d, "deb")["name"])
        owner = users.make()
        ws = create(d, owner, "root", image=image)
        assert CODE_OWNER not in backend_state(d, ws["id"])
        assert ok(d, ws["ref"], "id -u; stat -c %u:%g /code") == "0\n0:0\n"
        assert ok(d, ws["ref"], "id -u", user=owner) == "1000\n"  # the account is there
