"""scp and sftp into a workspace: big files both ways, and no way out of it.

On both backends (:class:`Box`): a busybox sandbox, where den's own sftp server
serves it, and a Debian microVM, where the image's OpenSSH sftp-server does (a
busybox microVM has none: scp and sftp there say so).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.ssh.conftest import Box, Person

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


def _login(box: Box) -> tuple[str, str]:
    """(uid, name) of the account an ssh login gets inside (root in busybox, the
    owner's own in Debian)."""
    uid, name = box.owner.ssh(box.name, "id -u; id -un").stdout.split()
    return uid, name


def test_scp_50mb_up_and_down(sftp_box: Box, tmp_path: Path) -> None:
    alice, ws = sftp_box.owner, sftp_box.name
    src = _big(tmp_path)
    res = alice.scp(str(src), f"{ws}@127.0.0.1:/tmp/big.bin")
    assert res.returncode == 0, res.stderr
    inside = alice.ssh(ws, "sha256sum /tmp/big.bin; stat -c '%u %s' /tmp/big.bin").stdout.split()
    assert inside[0] == _digest(src) and inside[2:] == [_login(sftp_box)[0], str(SIZE)]
    back = tmp_path / "back.bin"
    res = alice.scp(f"{ws}@127.0.0.1:/tmp/big.bin", str(back))
    assert res.returncode == 0, res.stderr
    assert _digest(back) == _digest(src)
    # ~ is the workspace user's home (scp asks the server to expand it).
    assert alice.scp(str(src), f"{ws}@127.0.0.1:~/home.bin").returncode == 0
    assert alice.ssh(ws, "cd; ls").stdout.split() == ["home.bin"]
    assert alice.ssh(ws, "rm ~/home.bin /tmp/big.bin").returncode == 0


def test_sftp_50mb_up_and_down(sftp_box: Box, tmp_path: Path) -> None:
    alice, ws = sftp_box.owner, sftp_box.name
    src = _big(tmp_path)
    back = tmp_path / "back.bin"
    res = alice.sftp(ws, f"put {src} /tmp/s.bin\nget /tmp/s.bin {back}\n")
    assert res.returncode == 0, res.stderr
    assert _digest(back) == _digest(src)
    assert alice.ssh(ws, "sha256sum /tmp/s.bin; rm /tmp/s.bin").stdout.split()[0] == _digest(src)


def test_sftp_stays_inside(sftp_box: Box, tmp_path: Path) -> None:
    alice, ws = sftp_box.owner, sftp_box.name
    setup = "ln -sfn / /tmp/rootlink; ln -sfn ../../../../../../etc /tmp/up; mkdir -p /tmp/in"
    assert alice.ssh(ws, setup).returncode == 0
    passwd = alice.ssh(ws, "cat /etc/passwd").stdout
    assert passwd and passwd != Path("/etc/passwd").read_text()
    res = alice.sftp(ws, "cd /\nls\ncd ..\ncd ..\npwd\nls /tmp/rootlink/\n")
    assert res.returncode == 0, res.stderr
    listing = res.stdout.split()
    assert "tmp" in listing and "var" in listing
    assert "work" not in listing and "home" in listing  # /work is the host's; bb has /home
    assert "Remote working directory: /" in res.stdout
    # Absolute paths, .. and symlinks all resolve inside the workspace.
    for path in ("/etc/passwd", "/../../etc/passwd", "/tmp/rootlink/etc/passwd", "/tmp/up/passwd"):
        out = tmp_path / "got"
        out.unlink(missing_ok=True)
        got = alice.sftp(ws, f"get {path} {out}\n")
        assert got.returncode == 0, (path, got.stderr)
        assert out.read_text() == passwd, path
    shadow = alice.sftp(ws, f"get /etc/shadow {tmp_path / 'shadow'}\n")
    assert shadow.returncode != 0 and not (tmp_path / "shadow").exists()
    # Writes through a symlink land inside too.
    up = tmp_path / "note"
    up.write_text("written\n")
    assert alice.sftp(ws, f"put {up} /tmp/rootlink/tmp/in/note\n").returncode == 0
    assert alice.ssh(ws, "cat /tmp/in/note; rm -r /tmp/in").stdout == "written\n"
    assert not Path("/tmp/in/note").exists()


def test_sftp_operations(sftp_box: Box, tmp_path: Path) -> None:
    alice, ws = sftp_box.owner, sftp_box.name
    f = tmp_path / "a.txt"
    f.write_text("abc\n")
    batch = (
        "mkdir /tmp/d\ncd /tmp/d\nput " + str(f) + " a.txt\nrename a.txt b.txt\n"
        "chmod 600 b.txt\nln -s b.txt c.txt\nls -l\ndf -h /\nrm c.txt\n"
    )
    res = alice.sftp(ws, batch)
    assert res.returncode == 0, res.stderr
    assert "-rw-------" in res.stdout and _login(sftp_box)[1] in res.stdout
    listed = alice.ssh(ws, "ls /tmp/d; stat -c %a /tmp/d/b.txt; rm -r /tmp/d").stdout.split()
    assert listed == ["b.txt", "600"]


def _inside_cmdlines(box: Box) -> list[bytes]:
    """The command lines of the processes inside a microVM (its own kernel's)."""
    script = "for p in /proc/[0-9]*; do cat $p/cmdline; echo; done 2>/dev/null; true"
    out: bytes = box.owner.ssh(box.name, script, input=b"").stdout
    return out.splitlines()


def test_image_sftp_server_is_used_when_present(deb_box: Box, tmp_path: Path) -> None:
    """The image's own sftp-server: a sandbox's seen in its cgroup on the host, a
    microVM's in its guest."""
    alice, ws = deb_box.owner, deb_box.name
    # den's images carry OpenSSH's sftp-server (the presets and the tests' Debian image).
    assert alice.ssh(ws, "test -x /usr/lib/openssh/sftp-server").returncode == 0
    f = tmp_path / "n.txt"
    f.write_text("native\n")
    res = alice.sftp(ws, f"put {f} /tmp/n.txt\n!true\nls -l /tmp/n.txt\n")
    assert res.returncode == 0, res.stderr
    assert alice.ssh(ws, "cat /tmp/n.txt; rm /tmp/n.txt").stdout == "native\n"
    ws_id = alice.d.call("workspace.get", ref=deb_box.ref)["id"]
    procs = Path(f"/sys/fs/cgroup/pids/den{alice.d.instance}/{ws_id}/cgroup.procs")

    def cmdlines() -> list[bytes]:
        if deb_box.backend == "microvm":
            return _inside_cmdlines(deb_box)
        names = []
        for pid in procs.read_text().split():
            with contextlib.suppress(OSError):
                names.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        return names

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
            names = cmdlines()
            if any(b"sftp-server" in n for n in names):
                break
            time.sleep(0.1)
        assert any(b"/usr/lib/openssh/sftp-server" in n for n in names), names
        assert not any(b"sftp_worker" in n for n in names)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sftp_into_a_microvm_without_sftp_server_says_why(
    vm_owner: Person, bb_vm: str, tmp_path: Path
) -> None:
    """A busybox microVM has no sftp-server: sftp and scp fail, saying what to do."""
    res = vm_owner.sftp(bb_vm, "ls /\n", timeout=60)
    assert res.returncode != 0
    f = tmp_path / "x"
    f.write_text("x\n")
    res2 = vm_owner.scp(str(f), f"{bb_vm}@127.0.0.1:/tmp/x", timeout=60)
    assert res2.returncode != 0
    said = res.stderr + res2.stderr
    assert "no sftp-server" in said and "openssh-sftp-server" in said, said
    assert vm_owner.d.call("workspace.get", ref=f"{vm_owner.name}/{bb_vm}")["state"] == "running"
