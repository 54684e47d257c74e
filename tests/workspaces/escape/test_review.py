"""Findings of a hostile-tenant review of the hardened sandbox.

The sftp worker (den's own SFTP server, used when a workspace has no
sftp-server: a member can simply delete its own) runs as a host process that
has joined the workspace: it is outside the workspace's seccomp filter and pid
namespace. Before: a path of ``~`` and a non-UTF-8 byte made it raise while
encoding its error reply; Python's traceback then opened the host paths of
den's sources inside the workspace's root, where the member had planted files
with a ``coding:`` cookie naming a codec module it had also planted under the
host's stdlib path. That module ran in the worker: seccomp mode 0, and
``unshare(CLONE_NEWUSER)`` succeeded. Now the worker imports nothing after the
chroot, prints no source lines, and answers that request with an error.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

from tests.conftest import ROOT, Daemon
from tests.workspaces import conftest as wsc
from tests.workspaces.conftest import Users, create, init_pid

# The escape suite acts as root inside, the most a workspace has (exec's default
# is the owner's own account).
ok = partial(wsc.ok, user="root")
sh = partial(wsc.sh, user="root")

STDLIB = f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}"
MARKER = "/tmp/codec-ran"
# Runs if the worker imports it: records whether a seccomp filter was on and
# whether a nested user namespace could be made.
PLANTED_CODEC = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
mode = libc.prctl(21, 0, 0, 0, 0)
rc = libc.unshare(0x10000000)
with open({MARKER!r}, 'w') as f:
    f.write(f'seccomp={{mode}} unshare={{rc}}')
"""
STATUS, EXTENDED, INIT, VERSION = 101, 200, 1, 2
NO_SUCH_FILE = 2


def packet(kind: int, body: bytes) -> bytes:
    return struct.pack(">I", len(body) + 1) + bytes((kind,)) + body


def string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def replies(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    while len(data) >= 5:
        n = struct.unpack(">I", data[:4])[0]
        out.append((data[4], data[5 : 4 + n]))
        data = data[4 + n :]
    return out


def worker_argv(d: Daemon, ws_id: str) -> list[str]:
    """The command the sandbox backend's sftp runs for the workspace's root."""
    pid = init_pid(d, ws_id)
    started = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return [
        sys.executable,
        "-I",
        "-m",
        "den.ssh.sftp_worker",
        "--pid",
        str(pid),
        "--start-time",
        str(started),
        "--user",
        "0:0",
        "--home",
        "/root",
        "--cgroup",
        f"/den{d.instance}/{ws_id}",
        "--bundle",
        str(d.data_dir / "bundles" / ws_id),
    ]


def test_sftp_worker_runs_no_module_the_workspace_planted(
    pool_daemon: Daemon, debian_image: str, users: Users
) -> None:
    d = pool_daemon
    ws = create(d, users.make(), "sftpplant", image=debian_image)
    ref = ws["ref"]
    # den's sources and the stdlib's encodings, at the host's paths, inside the workspace.
    sources = ROOT / "src" / "den" / "ssh"
    cookie = "# -*- coding: denplanted -*-\\n" + "x = 1\\n" * 500
    for name in ("sftp_worker.py", "sftp_server.py"):
        ok(d, ref, f"mkdir -p {sources} && printf '{cookie}' > {sources}/{name}")
    ok(d, ref, f"mkdir -p {STDLIB}/encodings")
    ok(d, ref, f"cat > {STDLIB}/encodings/denplanted.py <<'EOF'\n{PLANTED_CODEC}\nEOF")

    req = struct.pack(">I", 7) + string(b"expand-path@openssh.com") + string(b"~\xff")
    data = packet(INIT, struct.pack(">I", 3)) + packet(EXTENDED, req)
    p = subprocess.run(
        worker_argv(d, ws["id"]), input=data, capture_output=True, timeout=60, check=False
    )
    planted = sh(d, ref, f"cat {MARKER}")
    assert planted["exit_code"] != 0, f"the planted module ran in the worker: {planted['stdout']}"
    assert b"x = 1" not in p.stderr, p.stderr  # no source line read from the workspace
    # The request gets an error reply and the session ends normally.
    kinds = replies(p.stdout)
    assert [k for k, _ in kinds] == [VERSION, STATUS], (kinds, p.stderr)
    assert struct.unpack(">II", kinds[1][1][:8]) == (7, NO_SUCH_FILE)
    assert p.returncode == 0, p.stderr


def test_sftp_worker_runs_under_the_workspace_filter(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    """Whatever goes wrong in it, the worker can do no more than the workspace's
    own processes: the same seccomp filter, no_new_privs, no nested namespace."""
    d = pool_daemon
    ws = create(d, users.make(), "sftpfilter", image=bb_image)
    p = subprocess.Popen(worker_argv(d, ws["id"]), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(packet(INIT, struct.pack(">I", 3)))
        p.stdin.flush()
        head = p.stdout.read(5)
        assert head[4] == VERSION, head
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{p.pid}/status").read_text().splitlines()
        )
        assert status["Seccomp"].strip() == "2", status["Seccomp"]
        assert status["NoNewPrivs"].strip() == "1"
        p.stdin.close()
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_sysfs_names_no_loop_device_backing_file(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    """Before: /sys/block/loopN/loop/backing_file named the host path of every
    den pool image on the host (other instances' data directories too)."""
    d = pool_daemon
    ws = create(d, users.make(), "blockview", image=bb_image)
    found = ok(d, ws["ref"], "find /sys -name backing_file 2>/dev/null; ls /sys/block; true")
    assert found.strip() == "", found
    assert str(d.data_dir) not in ok(d, ws["ref"], "cat /sys/block/*/loop/backing_file; true")
