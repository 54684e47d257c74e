"""Unix sockets over SSH both ways: ``ssh -L LOCAL:/path/in/ws.sock``
(direct-streamlocal, VS Code's socket mode) and ``ssh -R /path/in/ws.sock:LOCAL``
(streamlocal-forward, Docker-socket forwarding), with the real OpenSSH client;
the path is always the workspace's, never the host's."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ssh.conftest import Person, make_ws

# Inside: an upper-casing echo server on a Unix socket (argv[1]), one client at a time.
ECHO_SERVER = """
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(4)
open(sys.argv[1] + ".up", "w").close()
while True:
    c, _ = s.accept()
    while (data := c.recv(65536)):
        c.sendall(data.upper())
    c.close()
"""
# Inside: send argv[2] to the Unix socket argv[1], print what comes back until EOF.
CLIENT = """
import socket, sys
c = socket.socket(socket.AF_UNIX)
c.connect(sys.argv[1]); c.sendall(sys.argv[2].encode()); c.shutdown(socket.SHUT_WR)
out = b""
while (data := c.recv(65536)):
    out += data
print(out.decode())
"""


@pytest.fixture
def local_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="dsl-"))  # short: sun_path is 108 bytes
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def forwarding(p: Person, ws: str, *spec: str) -> Iterator[subprocess.Popen[str]]:
    # Channel refusals are logged at INFO: keep them to check what the client was told.
    opts = [o if o != "LogLevel=ERROR" else "LogLevel=INFO" for o in p.opts()]
    proc = subprocess.Popen(
        ["ssh", *opts, "-N", "-o", "ExitOnForwardFailure=yes", *spec, f"{ws}@127.0.0.1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            # ssh -N with a forward whose channel den refused can sit out a
            # SIGTERM (seen: the whole wait); what it printed is kept anyway.
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def inside(p: Person, ws: str, script: str) -> subprocess.CompletedProcess[str]:
    return p.ssh(ws, script)


def wait_for(check: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def exchange(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(20)
        c.connect(str(path))
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
        return out


def refused(path: Path) -> bool:
    """Whether the forward at ``path`` answers nothing (ssh closes it, unread data
    making that a reset)."""
    try:
        return exchange(path, b'{"jsonrpc":"2.0","id":1,"method":"system.version"}\n') == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_local_forward_reaches_a_socket_inside(
    alice: Person, dev_image: str, local_dir: Path
) -> None:
    ws = make_ws(alice, image=dev_image)
    server = (
        f"setsid python3 -c '{ECHO_SERVER}' /tmp/echo.sock </dev/null >/dev/null 2>&1 & "
        "for i in $(seq 100); do [ -e /tmp/echo.sock.up ] && break; sleep 0.1; done"
    )
    assert inside(alice, ws, server).returncode == 0
    local = local_dir / "l.sock"
    with forwarding(alice, ws, "-L", f"{local}:/tmp/echo.sock") as proc:
        wait_for(lambda: local.exists() or proc.poll() is not None, "no local socket")
        payload = b"hello over a unix socket " * 5000  # more than a window's worth each way
        assert exchange(local, payload) == payload.upper()
        assert exchange(local, b"again") == b"AGAIN"  # one channel per connection


def test_remote_forward_serves_a_socket_inside(
    alice: Person, dev_image: str, local_dir: Path
) -> None:
    ws = make_ws(alice, image=dev_image)
    local = local_dir / "r.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(local))
    srv.listen(4)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = srv.accept()
                with c:
                    while data := c.recv(65536):
                        c.sendall(data[::-1])

    threading.Thread(target=serve, daemon=True).start()
    try:
        path = "/tmp/fwd.sock"
        with forwarding(alice, ws, "-R", f"{path}:{local}") as proc:
            wait_for(
                lambda: (
                    proc.poll() is not None or inside(alice, ws, f"test -S {path}").returncode == 0
                ),
                "no socket inside",
            )
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            res = inside(alice, ws, f"python3 -c '{CLIENT}' {path} 'from inside'")
            assert res.stdout.strip() == "edisni morf", res
            owner = inside(alice, ws, f'stat -c "%u %a" {path}; id -u').stdout.split()
            assert owner == [owner[2], "600", owner[2]], owner
        # The listener goes with the connection.
        wait_for(
            lambda: inside(alice, ws, f"python3 -c '{CLIENT}' {path} x").returncode != 0,
            "still served after the client left",
        )
    finally:
        srv.close()


def test_a_home_that_reads_as_an_option(alice: Person, dev_image: str, local_dir: Path) -> None:
    """A relative path starts at the account's home, even one the tenant made
    start with "-" (a relative home in /etc/passwd): no option to the worker."""
    ws = make_ws(alice, image=dev_image)
    root = f"root+{ws}"
    set_home = (  # as /etc/passwd has it: the account's home is "-home" (/-home from /)
        f'mkdir /-home && awk -F: -v OFS=: \'$1 == "{alice.name}" {{ $6 = "-home" }} 1\' '
        "/etc/passwd > /tmp/passwd && cat /tmp/passwd > /etc/passwd"
    )
    assert alice.ssh(root, set_home).returncode == 0
    server = (  # root's, at /-home/echo.sock, which the account may use
        f"umask 0; setsid python3 -c '{ECHO_SERVER}' /-home/echo.sock </dev/null >/dev/null 2>&1 & "
        "for i in $(seq 100); do [ -e /-home/echo.sock.up ] && break; sleep 0.1; done"
    )
    assert alice.ssh(root, server).returncode == 0
    local = local_dir / "h.sock"
    with forwarding(alice, ws, "-L", f"{local}:./echo.sock") as proc:
        wait_for(lambda: local.exists() or proc.poll() is not None, "no local socket")
        assert exchange(local, b"dash") == b"DASH"


def test_paths_resolve_inside_the_workspace(alice: Person, dev_image: str, local_dir: Path) -> None:
    """A symlink planted at the path to the daemon's own socket leads to the
    workspace's /run/den/den.sock (none), never the host's."""
    host_sock = Path("/run/den/den.sock")
    ws = make_ws(alice, image=dev_image)
    assert inside(alice, ws, f"ln -sf {host_sock} /tmp/evil.sock").returncode == 0
    local = local_dir / "e.sock"
    with forwarding(alice, ws, "-L", f"{local}:/tmp/evil.sock") as proc:
        wait_for(lambda: local.exists() or proc.poll() is not None, "no local socket")
        assert refused(local)
    assert proc.stderr is not None
    assert "cannot connect on /tmp/evil.sock" in proc.stderr.read()
    # -R at a planted symlink: bound inside or refused, never made on the host.
    target = local_dir / "host-side.sock"
    assert inside(alice, ws, f"ln -sf {target} /tmp/evil2.sock").returncode == 0
    with forwarding(alice, ws, "-R", f"/tmp/evil2.sock:{local_dir / 'x.sock'}") as proc:
        proc.wait(20)
        assert proc.returncode != 0  # bind() does not follow the link: the path is taken
    assert not target.exists()


def test_den_shell_and_denied_logins_refuse_unix_forwarding(alice: Person, local_dir: Path) -> None:
    local = local_dir / "s.sock"
    for login, why in (
        ("laptop-user", "forward Unix sockets through a workspace login"),
        ("nobody.nothing", "may not enter"),
    ):
        local.unlink(missing_ok=True)
        with forwarding(alice, login, "-L", f"{local}:/tmp/x.sock") as proc:
            wait_for(lambda: local.exists() or proc.poll() is not None, "no local socket")
            assert refused(local)
            time.sleep(0.5)
        assert proc.stderr is not None
        assert why in proc.stderr.read(), login
        with forwarding(alice, login, "-R", f"/tmp/y.sock:{local}") as proc:
            assert proc.wait(20) != 0
