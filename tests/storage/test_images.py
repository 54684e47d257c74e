"""Images: debootstrap builds, tarball imports, fix-ups, listing, deletion, bad input.

Every case that fails checks that nothing was left: no build subvolume in the
pool's images directory and no Image row.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from den.services import load_all
from tests.conftest import DEN, Daemon
from tests.storage.conftest import (
    images_dir,
    make_rootfs,
    own_pool_daemon,
    pool_entries,
    tar_dir,
    wait_job,
)
from tests.workspaces.escape.conftest import apt_debs

load_all()


def _name(prefix: str = "img") -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def assert_nothing_left(d: Daemon, name: str, before: set[str]) -> None:
    assert pool_entries(d) == before, "the pool's images directory changed"
    assert not any(e.startswith(".build-") for e in pool_entries(d))
    assert name not in {i["name"] for i in d.call("image.list")}
    with pytest.raises(RpcError) as info:
        d.call("image.get", name=name)
    assert info.value.code == -32001


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "host-file"
    path.write_text("host content\n")
    return path


@pytest.fixture
def rootfs(tmp_path: Path, victim: Path) -> Path:
    return make_rootfs(tmp_path / "rootfs", victim)


@pytest.fixture
def tarball(tmp_path: Path, rootfs: Path) -> Path:
    return tar_dir(rootfs, tmp_path / "rootfs.tar.gz", "--gzip")


def import_ok(d: Daemon, name: str, path: Path) -> dict[str, Any]:
    job = wait_job(d, d.call("image.import", name=name, path=str(path)))
    assert job["state"] == "done", job
    return job


def import_fails(d: Daemon, name: str, path: Path) -> dict[str, Any]:
    before = pool_entries(d)
    job = wait_job(d, d.call("image.import", name=name, path=str(path)))
    assert job["state"] == "failed", job
    assert_nothing_left(d, name, before)
    return job


# -- the session image -----------------------------------------------------------
def test_base_image_is_ready_and_read_only(pool_daemon: Daemon, base_image: dict[str, Any]) -> None:
    img = pool_daemon.call("image.get", name=base_image["name"])
    assert img["state"] == "ready" and img["suite"] in ("bookworm", "")
    assert img["size_bytes"] > 50 << 20
    path: Path = base_image["path"]
    with pytest.raises(OSError) as info:
        (path / "etc" / "den-write-test").write_text("x")
    assert info.value.errno == errno.EROFS
    ro = subprocess.run(
        ["btrfs", "property", "get", str(path), "ro"], capture_output=True, text=True
    )
    assert ro.stdout.strip() == "ro=true"


def _check_fixups(root: Path) -> None:
    assert not list((root / "etc").glob("ssh/ssh_host_*"))
    mid = root / "etc/machine-id"
    assert mid.is_file() and not mid.is_symlink() and mid.read_bytes() == b""
    assert not os.path.lexists(root / "var/lib/dbus/machine-id")
    assert "LANG=C.UTF-8" in (root / "etc/default/locale").read_text().splitlines()
    resolv = root / "etc/resolv.conf"
    assert resolv.is_file() and not resolv.is_symlink()
    assert "nameserver" not in resolv.read_text()
    assert (root / "etc/hostname").read_text() == "localhost\n"
    assert (root / "etc/skel/.profile").is_file()
    assert not list((root / "var/cache/apt").glob("**/*.deb"))
    assert not list((root / "var/cache/apt").glob("*.bin"))
    assert [p.name for p in (root / "var/lib/apt/lists").iterdir() if p.is_file()] in ([], ["lock"])


def test_base_image_fixups(base_image: dict[str, Any]) -> None:
    root: Path = base_image["path"]
    _check_fixups(root)
    assert (root / "etc/skel/.bashrc").is_file()
    # C.UTF-8 needs no generated locale on bookworm: glibc has it built in.
    out = subprocess.run(
        ["chroot", str(root), "/usr/bin/env", "LANG=C.UTF-8", "/usr/bin/locale"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "LC_ALL=" in out.stdout and not out.stderr


@pytest.mark.slow
def test_debootstrap_build_with_cli(pool_daemon: Daemon, base_image: dict[str, Any]) -> None:
    """A real debootstrap build, every session, through `den image build` with includes.

    The session's minbase image (``base_image``) is made first: in a fresh clone it
    fills the shared package cache, so this build shows that a build with the cache
    warm fetches no package the cache holds."""
    d = pool_daemon
    name = _name("deb")
    before = apt_debs(d)
    start = time.monotonic()
    # A real download from the Debian mirror: a minute here, longer on a loaded machine.
    res = d.cli("image", "build", name, "--include", "less,openssh-server", "--json", timeout=900)
    seconds = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    assert f'"name": "{name}"' in res.stdout and '"state": "ready"' in res.stdout
    root = images_dir(d) / name
    assert (root / "usr/bin/less").is_file() and (root / "usr/sbin/sshd").is_file()
    # openssh-server's postinst made host keys; every workspace must make its own.
    assert (root / "etc/ssh/sshd_config").is_file()
    _check_fixups(root)
    img = d.call("image.get", name=name)
    assert img["includes"] == ["less", "openssh-server"] and img["source"] == "debootstrap"
    job = next(j for j in d.call("job.list") if j["target"] == f"image:{name}")
    assert job["state"] == "done" and job["now"] == job["end"] == 1000
    c = d.client()
    events = c.call("audit.list", {"method": "image.build", "target": f"image:{name}"})
    c.close()
    assert [e["outcome"] for e in events] == ["ok"]
    after = apt_debs(d)
    assert {n: after.get(n) for n in before} == before  # nothing fetched anew
    fetched = len(set(after) - set(before))
    log = d.log_file.read_text()
    assert f"image {name}: {fetched} packages downloaded, " in log, fetched
    print(
        f"debootstrap bookworm minbase + less, openssh-server: {seconds:.1f}s, {img['size']}, "
        f"{fetched} packages downloaded"
    )
    d.call("image.delete", name=name)
    assert not root.exists()


@pytest.mark.slow
def test_build_of_unknown_package_fails_cleanly(pool_daemon: Daemon) -> None:
    d = pool_daemon
    name, before = _name("nopkg"), pool_entries(d)
    job = wait_job(d, d.call("image.build", name=name, include=["den-no-such-package"]))
    assert job["state"] == "failed" and "den-no-such-package" in job["error"], job
    assert job["error"].startswith("debootstrap failed")
    assert_nothing_left(d, name, before)


@pytest.mark.slow
def test_cancelled_build_leaves_nothing(pool_daemon: Daemon) -> None:
    d = pool_daemon
    name, before = _name("cancel"), pool_entries(d)
    job = d.call("image.build", name=name)
    deadline = time.monotonic() + 120
    while job["now"] < 100 and job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = d.call("job.get", id=job["id"])
    assert any(e.startswith(".build-") for e in pool_entries(d))
    assert d.call("image.get", name=name)["state"] == "building"
    err = d.error("image.delete", name=name)
    assert err.code == -32002 and job["id"] in err.message
    job = d.call("job.cancel", id=job["id"])
    assert job["state"] == "cancelled"
    assert_nothing_left(d, name, before)
    assert d.error("job.cancel", id=job["id"]).code == -32002


# -- import --------------------------------------------------------------------------
@pytest.mark.parametrize("compress", ["--gzip", "--xz", "--zstd", "--bzip2", ""])
def test_import_formats_and_fixups(
    pool_daemon: Daemon, tmp_path: Path, rootfs: Path, victim: Path, compress: str
) -> None:
    d = pool_daemon
    name = _name("imp")
    tb = tar_dir(rootfs, tmp_path / f"root.tar{compress.replace('--', '.')}", compress)
    job = import_ok(d, name, tb)
    assert job["result"]["source"] == "import" and job["now"] == job["end"]
    root = images_dir(d) / name
    _check_fixups(root)
    assert victim.read_text() == "host content\n", "a symlink in the image redirected a write"
    assert (root / "etc/ssh/sshd_config").read_text() == "Port 22\n"
    st = (root / "etc/owned").stat()
    assert (st.st_uid, st.st_gid) == (1234, 2345)
    assert os.getxattr(root / "etc/owned", "user.den") == b"kept"
    assert (root / "usr/bin/su").stat().st_mode & 0o7777 == 0o4755
    assert (root / "tmp").stat().st_mode & 0o7777 == 0o1777
    assert (root / "bin").is_symlink()
    d.call("image.delete", name=name)


@pytest.mark.slow
def test_import_of_a_full_rootfs(
    pool_daemon: Daemon, base_image: dict[str, Any], tmp_path: Path
) -> None:
    """The session image exported with tar and imported again still runs."""
    d = pool_daemon
    name = _name("copy")
    tb = tar_dir(base_image["path"], tmp_path / "base.tar.zst")
    import_ok(d, name, tb)
    root = images_dir(d) / name
    assert (root / "usr/bin/passwd").stat().st_mode & 0o4000
    assert (root / "etc/shadow").stat().st_gid == 42  # shadow
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "echo hi"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "hi\n"
    d.call("image.delete", name=name)


def test_image_list_get_delete(pool_daemon: Daemon, tarball: Path) -> None:
    d = pool_daemon
    name = _name()
    import_ok(d, name, tarball)
    row = next(i for i in d.call("image.list") if i["name"] == name)
    assert row["state"] == "ready" and row["source"] == "import" and row["workspaces"] == 0
    assert row["size_bytes"] > 0 and row["size"]
    assert d.call("image.get", name=name) == row
    assert d.call("image.delete", name=name) == {"deleted": name}
    assert not (images_dir(d) / name).exists()
    assert d.error("image.get", name=name).code == -32001
    assert d.error("image.delete", name=name).code == -32001


def test_name_taken(pool_daemon: Daemon, tarball: Path) -> None:
    d = pool_daemon
    name = _name()
    import_ok(d, name, tarball)
    for method, extra in (("image.import", {"path": str(tarball)}), ("image.build", {})):
        err = d.error(method, name=name, **extra)
        assert err.code == -32002 and "exists already" in err.message
    d.call("image.delete", name=name)


def _insert_workspace(d: Daemon, owner: str, ws: str, image: str) -> str:
    """A workspace row as workspace.create leaves it (the sandbox is not needed here)."""
    user_id = None
    wid = secrets.token_hex(8)
    now = "2026-01-01 00:00:00.000000"
    with sqlite3.connect(d.data_dir / "den.db", timeout=30) as db:
        (user_id,) = db.execute("SELECT id FROM users WHERE name = ?", (owner,)).fetchone()
        db.execute(
            "INSERT INTO workspaces (id, user_id, name, image, backend, state, state_reason,"
            " backend_state, cpu, memory_mb, pids, created_at, updated_at, last_activity_kind)"
            " VALUES (?, ?, ?, ?, 'sandbox', 'creating', '', '{}', 1.0, 512, 100, ?, ?, '')",
            (wid, user_id, ws, image, now, now),
        )
    return wid


def test_delete_refused_while_in_use(pool_daemon: Daemon, tarball: Path) -> None:
    d = pool_daemon
    name, owner = _name(), _name("u")
    import_ok(d, name, tarball)
    d.call("user.create", name=owner)
    wid = _insert_workspace(d, owner, "web", name)
    try:
        assert d.call("image.get", name=name)["workspaces"] == 1
        err = d.error("image.delete", name=name)
        assert err.code == -32002 and f"{owner}/web" in err.message
        assert err.data == {"workspaces": [f"{owner}/web"]}
        assert (images_dir(d) / name).exists()
        res = d.cli("image", "rm", name, "--yes")
        assert res.returncode == 5 and f"{owner}/web" in res.stderr
    finally:
        with sqlite3.connect(d.data_dir / "den.db", timeout=30) as db:
            db.execute("DELETE FROM workspaces WHERE id = ?", (wid,))
    d.call("image.delete", name=name)
    d.call("user.delete", name=owner)


def test_cli_import_ls_rm(pool_daemon: Daemon, tarball: Path, tmp_path: Path) -> None:
    d = pool_daemon
    name = _name("cli")
    cwd = os.getcwd()
    os.chdir(tarball.parent)
    try:  # a relative path is made absolute by the CLI
        res = d.cli("image", "import", name, tarball.name)
    finally:
        os.chdir(cwd)
    assert res.returncode == 0, res.stderr
    assert name in res.stdout and "ready" in res.stdout
    res = d.cli("image", "ls", "--json", check=True)
    assert name in res.stdout
    res = d.cli("image", "ls", check=True)
    assert name in res.stdout and "workspaces" in res.stdout
    bad = tmp_path / "truncated.tar.gz"
    bad.write_bytes(tarball.read_bytes()[:300])
    res = d.cli("image", "import", _name("bad"), str(bad))
    assert res.returncode == 2 and "corrupt or truncated" in res.stderr
    res = d.cli("image", "rm", name, "--yes")
    assert res.returncode == 0, res.stderr
    assert name not in d.cli("image", "ls", "--json", check=True).stdout


# -- bad input -------------------------------------------------------------------------
HOSTILE = [
    "../etc",
    "a/b",
    "x; rm -rf /",
    "",
    "A",
    "-rf",
    ".build-x",
    "a" * 40,
    "$(id)",
    "é",
    "a b",
]


@pytest.mark.parametrize("bad", HOSTILE)
def test_hostile_names(pool_daemon: Daemon, tarball: Path, bad: str) -> None:
    d = pool_daemon
    before = pool_entries(d)
    for method, extra in (("image.build", {}), ("image.import", {"path": str(tarball)})):
        err = d.error(method, name=bad, **extra)
        assert err.code == -32602 and err.data["errors"][0]["field"] == "name"
        assert d.error("image.get", name=bad).code == -32602
    assert pool_entries(d) == before


@pytest.mark.parametrize(
    "include",
    [
        ["vim;rm -rf /"],
        ["$(reboot)"],
        ["a b"],
        ["-o"],
        ["Vim"],
        ["../x"],
        ["a|b"],
        ["x`id`"],
        ["less,vim&&id"],
        ["--variant=buildd"],
        ["l"],
    ],
)
def test_bad_includes(pool_daemon: Daemon, include: list[str]) -> None:
    d = pool_daemon
    name, before = _name(), pool_entries(d)
    err = d.error("image.build", name=name, include=include)
    assert err.code == -32602 and err.data["errors"][0]["field"].startswith("include")
    assert_nothing_left(d, name, before)


@pytest.mark.parametrize("suite", ["nosuchsuite", "../bookworm", "Bookworm", "bookworm;id", ""])
def test_bad_suite(pool_daemon: Daemon, suite: str) -> None:
    d = pool_daemon
    name, before = _name(), pool_entries(d)
    err = d.error("image.build", name=name, suite=suite)
    assert err.code == -32602 and err.data["errors"][0]["field"] == "suite"
    assert_nothing_left(d, name, before)


def test_unknown_image_and_job(pool_daemon: Daemon) -> None:
    d = pool_daemon
    for method in ("image.get", "image.delete"):
        err = d.error(method, name="no-such-image")
        assert err.code == -32001 and "no image named 'no-such-image'" in err.message
    assert d.error("job.get", id="j0123456789").code == -32001
    assert d.error("job.get", id="../x").code == -32602


def _bad_files(tmp: Path, tarball: Path) -> Iterator[tuple[str, Path, str]]:
    yield "missing", tmp / "nope.tar.gz", "no file at"
    yield "directory", tmp, "not a regular file"
    empty = tmp / "empty.tar"
    empty.write_bytes(b"")
    yield "empty", empty, "is empty"
    rnd = tmp / "random.tar.gz"
    rnd.write_bytes(b"\x00\x01" + os.urandom(4096))
    yield "random bytes", rnd, "not a tar archive"
    yield "relative", Path("rootfs.tar.gz"), "not an absolute path"
    yield "device", Path("/dev/zero"), "not a regular file"


def test_bad_tarball_refused_at_once(pool_daemon: Daemon, tmp_path: Path, tarball: Path) -> None:
    d = pool_daemon
    for what, path, message in _bad_files(tmp_path, tarball):
        name, before = _name(), pool_entries(d)
        err = d.error("image.import", name=name, path=str(path))
        assert err.code == -32602, what
        assert err.data["errors"][0]["field"] == "path" and message in str(err), (what, str(err))
        assert_nothing_left(d, name, before)


@pytest.mark.parametrize("kind", ["truncated-gz", "corrupt-xz", "zstd-garbage"])
def test_corrupt_tarball_fails_the_job(
    pool_daemon: Daemon, tmp_path: Path, rootfs: Path, kind: str
) -> None:
    d = pool_daemon
    if kind == "truncated-gz":
        good = tar_dir(rootfs, tmp_path / "good.tar.gz", "--gzip")
        data = good.read_bytes()[: good.stat().st_size // 2]
    elif kind == "corrupt-xz":
        good = tar_dir(rootfs, tmp_path / "good.tar.xz", "--xz")
        raw = bytearray(good.read_bytes())
        raw[100:200] = os.urandom(100)
        data = bytes(raw)
    else:
        data = b"\x28\xb5\x2f\xfd" + os.urandom(8192)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data)
    job = import_fails(d, _name(), bad)
    assert job["error_code"] == -32602
    assert "corrupt or truncated" in job["error"], job["error"]


def test_not_a_rootfs(pool_daemon: Daemon, tmp_path: Path) -> None:
    d = pool_daemon
    src = tmp_path / "notroot" / "rootfs"
    (src / "etc").mkdir(parents=True)
    (src / "usr/bin").mkdir(parents=True)
    # The files sit under a top directory: not a tarball made from inside the root.
    tb = tar_dir(src.parent, tmp_path / "nested.tar.gz", "--gzip")
    job = import_fails(d, _name(), tb)
    assert "holds no root filesystem" in job["error"] and "/etc" in job["error"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "etc").mkdir()
    (docs / "README").write_text("hello\n")
    job = import_fails(d, _name(), tar_dir(docs, tmp_path / "docs.tar", ""))
    assert "neither /usr/bin nor /bin" in job["error"]


def test_import_needs_admin(pool_daemon: Daemon, tarball: Path) -> None:
    d = pool_daemon
    member = _name("m")
    d.call("user.create", name=member)
    try:
        for method, params in (
            ("image.import", {"name": _name(), "path": str(tarball)}),
            ("image.build", {"name": _name()}),
            ("image.delete", {"name": "x"}),
        ):
            resp = d.call_as(member, method, params)
            assert resp["error"]["code"] == -32003, (method, resp)
        assert "result" in d.call_as(member, "image.list", {})
        assert d.call_as(member, "job.list", {})["result"] == []
    finally:
        d.call("user.delete", name=member)


# -- a full pool, a killed daemon ----------------------------------------------------
@pytest.mark.slow
def test_full_pool(tmp_path: Path, rootfs: Path) -> None:
    """A tarball bigger than the pool: a clear error, nothing left, the pool usable again."""
    big = rootfs / "usr/share/big"
    big.parent.mkdir(parents=True)
    with big.open("wb") as f:  # sparse on the source; 400 MB of real zeros once unpacked
        f.truncate(400 << 20)
    tb = tar_dir(rootfs, tmp_path / "big.tar.zst")
    big.unlink()
    small = tar_dir(rootfs, tmp_path / "small.tar.gz", "--gzip")
    with own_pool_daemon("256M") as d:
        name = _name("big")
        job = import_fails(d, name, tb)
        assert "storage pool is full" in job["error"] and job["error_code"] == -32005, job
        import_ok(d, name, small)


def _pids_using(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd") if (entry / "cwd").exists() else ""
        except OSError:
            continue
        if str(path).encode() in cmd or cwd.startswith(str(path)):
            pids.append(int(entry.name))
    return pids


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(path) + "/")]


@pytest.mark.slow
def test_daemon_killed_during_build(victim: Path) -> None:
    with own_pool_daemon("3G") as d:
        pool = d.data_dir / "pool"
        name = "killed"
        job = d.call("image.build", name=name)
        deadline = time.monotonic() + 300
        # Past the download, into dpkg: debootstrap has /proc mounted in the target.
        while job["now"] < 560 and job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.3)
            job = d.call("job.get", id=job["id"])
        assert job["state"] == "running", job
        builds = [p for p in images_dir(d).iterdir() if p.name.startswith(".build-")]
        assert len(builds) == 1
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        deadline = time.monotonic() + 10
        while _pids_using(builds[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _pids_using(builds[0]), "debootstrap outlived the daemon"
        # Leftovers of other kinds, to be adopted or removed at start.
        stray = images_dir(d) / "stray"
        subprocess.run(
            ["btrfs", "subvolume", "create", str(stray)], check=True, capture_output=True
        )
        make_rootfs(stray, victim)
        (images_dir(d) / ".build-other-1234").mkdir()
        (images_dir(d) / "Junk").write_text("junk")
        d.start()
        assert pool_entries(d) == {"stray"}
        assert not _mounts_under(pool)
        images = d.call("image.list")
        assert [(i["name"], i["state"], i["source"]) for i in images] == [
            ("stray", "ready", "adopted")
        ]
        assert victim.read_text() == "host content\n"
        d.call("image.delete", name="stray")
        assert pool_entries(d) == set()


@pytest.mark.slow
def test_daemon_stopped_during_build() -> None:
    """SIGTERM cancels the build job: the daemon undoes it before it exits."""
    with own_pool_daemon("3G") as d:
        job = d.call("image.build", name="stopped")
        deadline = time.monotonic() + 120
        while job["now"] < 100 and job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            job = d.call("job.get", id=job["id"])
        assert any(e.startswith(".build-") for e in pool_entries(d))
        assert d.stop() == 0
        assert pool_entries(d) == set()
        with sqlite3.connect(d.data_dir / "den.db") as db:
            assert db.execute("SELECT count(*) FROM images").fetchone() == (0,)


# -- den init --image --------------------------------------------------------------------
def test_init_reuses_an_existing_image(pool_daemon: Daemon, base_image: dict[str, Any]) -> None:
    d = pool_daemon
    res = d.cli("init", "--yes", "--image", base_image["name"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"image {base_image['name']}: exists" in res.stdout and "reused" in res.stdout
    assert d.cli("init", "--yes", "--image", "Bad/Name").returncode == 2


@pytest.mark.slow
def test_init_image_build_failure_leaves_nothing() -> None:
    with own_pool_daemon("1G") as d:
        d.stop()
        env = {**d.env, "DEN_DEBIAN_MIRROR": "http://127.0.0.1:9/debian"}
        res = subprocess.run(
            [DEN, "init", "--yes", "--image", "first"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 7, res.stdout + res.stderr
        assert "error: image first: debootstrap failed" in res.stderr
        assert pool_entries(d) == set()
        with sqlite3.connect(d.data_dir / "den.db") as db:
            assert db.execute("SELECT count(*) FROM images").fetchone() == (0,)


def test_tarball_escaping_through_a_symlink(pool_daemon: Daemon, tmp_path: Path) -> None:
    """Members written through a symlink member must not land outside the image."""
    import io
    import tarfile

    outside = tmp_path / "outside"
    outside.mkdir()
    tb = tmp_path / "evil.tar"
    with tarfile.open(tb, "w") as t:
        for name, target in (
            ("etc", ""),
            ("usr", ""),
            ("usr/bin", ""),
            ("evil", str(outside)),
            ("rel", "../../outside"),
        ):
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if target else tarfile.DIRTYPE
            info.linkname = target
            t.addfile(info)
        for name in ("evil/pwned", "rel/pwned"):
            info = tarfile.TarInfo(name)
            info.size = 6
            t.addfile(info, io.BytesIO(b"pwned\n"))
    job = import_fails(pool_daemon, _name("evil"), tb)
    assert "Not a directory" in job["error"], job["error"]
    assert list(outside.iterdir()) == []
