"""scp and sftp into a workspace: big files both ways, and no way out of it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from pathlib import Path

from tests.ssh.conftest import Person, make_ws

SIZE = 50 * 1024 * 1024


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _big(tmp_path: Path) -> Path:
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        f.write(os.urandom(SIZE))
    return src


def test_scp_50mb_up_and_down(alice: Person, ws: str, tmp_path: Path) -> None:
    src = _big(tmp_path)
    res = alice.scp(str(src), f"{ws}@127.0.0.1:/tmp/big.bin")
    assert res.returncode == 0, res.stderr
    inside = alice.ssh(ws, "sha256sum /tmp/big.bin; stat -c '%u %s' /tmp/big.bin").stdout.split()
    assert inside[0] == _digest(src) and inside[2:] == ["0", str(SIZE)]
    back = tmp_path / "back.bin"
    res = alice.scp(f"{ws}@127.0.0.1:/tmp/big.bin", str(back))
    assert res.returncode == 0, res.stderr
    assert _digest(back) == _digest(src)
    # ~ is the workspace user's home (scp asks the server to expand it).
    assert alice.scp(str(src), f"{ws}@127.0.0.1:~/home.bin").returncode == 0
    assert alice.ssh(ws, "ls /root").stdout.split() == ["home.bin"]


def test_sftp_50mb_up_and_down(alice: Person, ws: str, tmp_path: Path) -> None:
    src = _big(tmp_path)
    back = tmp_path / "back.bin"
    res = alice.sftp(ws, f"put {src} /tmp/s.bin\nget /tmp/s.bin {back}\n")
    assert res.returncode == 0, res.stderr
    assert _digest(back) == _digest(src)
    assert alice.ssh(ws, "sha256sum /tmp/s.bin").stdout.split()[0] == _digest(src)


def test_sftp_stays_inside(alice: Person, ws: str, tmp_path: Path) -> None:
    setup = (
        "ln -s / /tmp/rootlink; ln -s ../../../../../../etc /tmp/up; mkdir -p /srv;"
        "echo inside > /srv/mark"
    )
    assert alice.ssh(ws, setup).returncode == 0
    res = alice.sftp(ws, "cd /\nls\ncd ..\ncd ..\npwd\nls /tmp/rootlink/\n")
    assert res.returncode == 0, res.stderr
    listing = res.stdout.split()
    assert "srv" in listing and "var" in listing
    assert "work" not in listing and "home" in listing  # /work is the host's; bb has /home
    assert "Remote working directory: /" in res.stdout
    # Absolute paths, .. and symlinks all resolve inside the workspace.
    for path in ("/etc/passwd", "/../../etc/passwd", "/tmp/rootlink/etc/passwd", "/tmp/up/passwd"):
        out = tmp_path / "got"
        out.unlink(missing_ok=True)
        got = alice.sftp(ws, f"get {path} {out}\n")
        assert got.returncode == 0, (path, got.stderr)
        text = out.read_text()
        assert "dev:x:1000:1000" in text and text != Path("/etc/passwd").read_text(), path
    shadow = alice.sftp(ws, f"get /etc/shadow {tmp_path / 'shadow'}\n")
    assert shadow.returncode != 0 and not (tmp_path / "shadow").exists()
    # Writes through a symlink land inside too.
    up = tmp_path / "note"
    up.write_text("written\n")
    assert alice.sftp(ws, f"put {up} /tmp/rootlink/srv/note\n").returncode == 0
    assert alice.ssh(ws, "cat /srv/note").stdout == "written\n"
    assert not Path("/srv/note").exists()


def test_sftp_operations(alice: Person, ws: str, tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("abc\n")
    batch = (
        "mkdir /tmp/d\ncd /tmp/d\nput " + str(f) + " a.txt\nrename a.txt b.txt\n"
        "chmod 600 b.txt\nln -s b.txt c.txt\nls -l\ndf -h /\nrm c.txt\n"
    )
    res = alice.sftp(ws, batch)
    assert res.returncode == 0, res.stderr
    assert "-rw-------" in res.stdout and "root" in res.stdout
    assert alice.ssh(ws, "ls /tmp/d; stat -c %a /tmp/d/b.txt").stdout.split() == ["b.txt", "600"]


def test_image_sftp_server_is_used_when_present(
    alice: Person, debian_image: str, tmp_path: Path
) -> None:
    ws = make_ws(alice, image=debian_image)
    # den's images carry OpenSSH's sftp-server (the presets and the tests' Debian image).
    assert alice.ssh(ws, "test -x /usr/lib/openssh/sftp-server").returncode == 0
    f = tmp_path / "n.txt"
    f.write_text("native\n")
    res = alice.sftp(ws, f"put {f} /tmp/n.txt\n!true\nls -l /tmp/n.txt\n")
    assert res.returncode == 0, res.stderr
    assert alice.ssh(ws, "cat /tmp/n.txt").stdout == "native\n"
    ws_id = alice.d.call("workspace.get", ref=f"{alice.name}/{ws}")["id"]
    procs = Path(f"/sys/fs/cgroup/pids/den{alice.d.instance}/{ws_id}/cgroup.procs")
    proc = subprocess.Popen(
        ["sftp", *[o if o != "-p" else "-P" for o in alice.opts()], f"{ws}@127.0.0.1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        names: list[bytes] = []
        while time.monotonic() < deadline:
            names = []
            for pid in procs.read_text().split():
                with contextlib.suppress(OSError):
                    names.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            if any(b"sftp-server" in n for n in names):
                break
            time.sleep(0.1)
        assert any(b"/usr/lib/openssh/sftp-server" in n for n in names), names
        assert not any(b"sftp_worker" in n for n in names)
    finally:
        proc.kill()
        proc.wait()
