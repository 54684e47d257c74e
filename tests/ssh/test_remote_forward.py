"""ssh -R: a port inside the workspace whose connections reach a server on the client's side."""

from __future__ import annotations

import contextlib
import hashlib
import re
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.ssh.conftest import Person, make_ws

BULK = bytes(range(256)) * 16384  # 4 MiB


class Server:
    """A TCP server on the client's loopback: ``handle`` serves each connection."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.handle = handle
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handle(conn)

    def close(self) -> None:
        self.sock.close()


def _reply(conn: socket.socket) -> None:
    line = conn.makefile("rb").readline()
    conn.sendall(b"echo:" + line)


def _bulk(conn: socket.socket) -> None:
    conn.sendall(BULK)


@pytest.fixture
def reply() -> Iterator[Server]:
    s = Server(_reply)
    yield s
    s.close()


def forward(p: Person, login: str, spec: str, *extra: str) -> subprocess.Popen[str]:
    """``ssh -N -R SPEC`` in the background (``extra`` options come first: they win)."""
    return subprocess.Popen(
        [
            "ssh",
            *extra,
            *p.opts(),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            spec,
            f"{login}@127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    proc.wait(10)


def inside_until(p: Person, ws: str, cmd: str, want: str, timeout: float = 20) -> str:
    """Run ``cmd`` in the workspace until its output has ``want`` (the forward is set up
    in the background of ssh -N)."""
    deadline = time.monotonic() + timeout
    while True:
        res = p.ssh(ws, cmd)
        if want in res.stdout or time.monotonic() > deadline:
            return str(res.stdout)
        time.sleep(0.3)


def test_remote_forward_serves_a_port_inside(alice: Person, ws: str, reply: Server) -> None:
    bulk = Server(_bulk)
    fwd = forward(alice, ws, f"7000:127.0.0.1:{reply.port}", "-R", f"7001:127.0.0.1:{bulk.port}")
    try:
        out = inside_until(alice, ws, "echo hello | nc 127.0.0.1 7000", "echo:hello")
        assert out == "echo:hello\n"
        # Bytes to the workspace keep their order and count (flow control, 4 MiB).
        got = alice.ssh(ws, "nc 127.0.0.1 7001 | md5sum").stdout.split()[0]
        assert got == hashlib.md5(BULK).hexdigest()
        # On the workspace's loopback only: its own address has nothing on 7000.
        addr = alice.ssh(ws, "hostname -i").stdout.split()[0]
        assert alice.ssh(ws, f"echo x | nc {addr} 7000").stdout == ""
        sessions = alice.d.call("session.list", user=alice.name)
        fwd_sessions = [s for s in sessions if "forward" in s["kind"]]
        assert fwd_sessions and fwd_sessions[0]["bytes_in"] >= len(BULK), sessions
        assert fwd.poll() is None
    finally:
        stop(fwd)
        bulk.close()
    # The connection's end closes the listener.
    time.sleep(0.5)
    assert alice.ssh(ws, "echo x | nc 127.0.0.1 7000").stdout == ""


# Connects and writes in one go, then reads the reply (no wait in between).
AT_ONCE = """
import socket, sys
for i in range(10):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"hi%d\\n" % i)
    print(s.makefile("rb").readline().decode().strip())
"""


def test_bytes_sent_at_once_on_connect_are_kept(
    alice: Person, dev_image: str, reply: Server
) -> None:
    """A client inside that writes the moment it connects (before den has the
    client's channel open) loses nothing: the first read is held, not dropped."""
    ws = make_ws(alice, dev_image)
    out = alice.ssh(
        ws,
        "python3",
        "-",
        "7002",
        input=AT_ONCE,
        args=("-o", "ExitOnForwardFailure=yes", "-R", f"7002:127.0.0.1:{reply.port}"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"echo:hi{i}" for i in range(10)], out


def test_port_zero_is_allocated_and_reported(alice: Person, ws: str, reply: Server) -> None:
    fwd = forward(alice, ws, f"0:127.0.0.1:{reply.port}", "-o", "LogLevel=INFO")
    try:
        assert fwd.stderr is not None
        said = ""
        while not (m := re.search(r"Allocated port (\d+) for remote forward", said)):
            assert select.select([fwd.stderr], [], [], 30)[0], f"ssh said only {said!r}"
            said += fwd.stderr.readline()
        port = int(m.group(1))
        out = inside_until(alice, ws, f"echo zero | nc 127.0.0.1 {port}", "echo:zero")
        assert out == "echo:zero\n"
    finally:
        stop(fwd)


def test_all_addresses_when_asked(alice: Person, ws: str, reply: Server) -> None:
    fwd = forward(alice, ws, f"*:7002:127.0.0.1:{reply.port}")
    try:
        addr = alice.ssh(ws, "hostname -i").stdout.split()[0]
        assert inside_until(alice, ws, f"echo a | nc {addr} 7002", "echo:a") == "echo:a\n"
    finally:
        stop(fwd)
    # A name that is not the workspace's is never resolved: refused.
    bad = forward(alice, ws, f"example.com:7003:127.0.0.1:{reply.port}")
    assert bad.wait(30) == 255
    assert bad.stderr is not None
    assert "remote port forwarding failed" in bad.stderr.read()


def test_cancel_closes_the_listener(alice: Person, ws: str, reply: Server, tmp_path: Path) -> None:
    ctl = str(tmp_path / "ctl")
    master = forward(
        alice,
        ws,
        f"7004:127.0.0.1:{reply.port}",
        "-o",
        "ControlMaster=yes",
        "-o",
        f"ControlPath={ctl}",
    )
    try:
        assert inside_until(alice, ws, "echo c | nc 127.0.0.1 7004", "echo:c") == "echo:c\n"
        res = subprocess.run(
            [
                "ssh",
                *alice.opts(),
                "-S",
                ctl,
                "-O",
                "cancel",
                "-R",
                f"7004:127.0.0.1:{reply.port}",
                f"{ws}@127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        time.sleep(0.3)
        assert alice.ssh(ws, "echo c | nc 127.0.0.1 7004").stdout == ""
        assert master.poll() is None  # the connection itself stays
    finally:
        stop(master)


def test_stopping_the_workspace_closes_the_listener(alice: Person, ws: str, reply: Server) -> None:
    fwd = forward(alice, ws, f"7005:127.0.0.1:{reply.port}")
    try:
        out = inside_until(alice, ws, "echo s | nc 127.0.0.1 7005", "echo:s")
        assert out == "echo:s\n", (fwd.poll(), alice.d.log_text()[-3000:])
        alice.d.call("workspace.stop", ref=f"{alice.name}/{ws}")
        # ssh starts it again: the listener of the stopped one is gone.
        assert alice.ssh(ws, "echo s | nc 127.0.0.1 7005").stdout == ""
    finally:
        stop(fwd)


def test_den_shell_login_is_refused(alice: Person, reply: Server) -> None:
    res = subprocess.run(
        [
            "ssh",
            "-v",
            *alice.opts(),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            f"7006:127.0.0.1:{reply.port}",
            f"{alice.name}@127.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 255
    assert "remote port forwarding failed for listen port 7006" in res.stderr
    assert "den: remote forwarding of port 7006 refused: forward through a workspace login" in (
        res.stderr
    )


def test_low_ports_need_root_inside(alice: Person, debian_image: str, reply: Server) -> None:
    ws = make_ws(alice, image=debian_image)
    assert alice.ssh(ws, "id -u").stdout.strip() != "0"  # the owner's own account
    low = forward(alice, ws, f"80:127.0.0.1:{reply.port}", "-v")
    assert low.wait(60) == 255
    assert low.stderr is not None
    err = low.stderr.read()
    assert "remote port forwarding failed for listen port 80" in err
    assert "only root inside may listen there" in err
    fwd = forward(alice, f"root+{ws}", f"80:127.0.0.1:{reply.port}")
    try:
        probe = "exec 3<>/dev/tcp/127.0.0.1/80; echo root >&3; cat <&3"
        assert inside_until(alice, ws, f"bash -c '{probe}'", "echo:root") == "echo:root\n"
    finally:
        stop(fwd)
