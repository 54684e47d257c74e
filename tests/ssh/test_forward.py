"""ssh -L to a server listening inside the workspace (on its loopback or address),
on both backends (a microVM's through its agent's TCP relay)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

from tests.ssh.conftest import Box


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_local_forward_to_http_server_inside(box: Box) -> None:
    alice, ws = box.owner, box.name
    start = (
        "setsid httpd -f -p 127.0.0.1:8080 -h /var/www </dev/null >/dev/null 2>&1 & "
        "echo $! > /tmp/httpd.pid"
    )
    assert alice.ssh(ws, start).returncode == 0
    port, port2 = _free_port(), _free_port()
    fwd = subprocess.Popen(
        [
            "ssh",
            *alice.opts(),
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            f"{port}:localhost:8080",
            "-L",
            f"{port2}:example.com:80",
            f"{ws}@127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert _get(f"http://127.0.0.1:{port}/index.html") == "hello from bb\n"
        sessions = alice.d.call("session.list", user=alice.name)
        assert any("forward" in s["kind"] and s["bytes_out"] > 0 for s in sessions), sessions
        # Only the workspace itself is a destination.
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port2}/", timeout=5)
            raise AssertionError("forwarded to a host outside the workspace")
        except OSError:
            pass
    finally:
        fwd.kill()
        fwd.wait()
        alice.ssh(ws, "kill $(cat /tmp/httpd.pid)")
