"""Debian's Chromium, headless, driven by Playwright, for benchmarks of den's pages.

Chromium drops connections it is opening whenever the host's addresses change
(ERR_NETWORK_CHANGED), and every workspace den starts adds a veth pair on the
host. So it runs in a network namespace of its own, whose 127.0.0.1:PORT is
relayed to the host's 127.0.0.1:PORT (Caddy). It trusts Caddy's internal root
through an NSS database in a HOME of its own. The same arrangement as the web
tests' ``browser`` fixture (tests/web/conftest.py), without pytest.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"
CLONE_NEWNET = 0x40000000
LIBC = ctypes.CDLL(None, use_errno=True)


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if LIBC.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def listen_in_netns(netns: str, port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` inside ``netns``, made by a thread that
    enters it (a socket stays in the namespace it was made in; the thread ends there)."""
    made: list[socket.socket | OSError] = []

    def enter() -> None:
        try:
            _setns(f"/run/netns/{netns}")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", port))
            sock.listen(64)
            made.append(sock)
        except OSError as err:  # raised in the caller below
            made.append(err)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    if isinstance(made[0], OSError):
        raise made[0]
    return made[0]


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def relay(listener: socket.socket, port: int) -> Iterator[None]:
    """Bytes from the browser's namespace to the host's 127.0.0.1:``port``, as they come."""
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                inside, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            inside.settimeout(None)
            try:
                outside = socket.create_connection(("127.0.0.1", port))
            except OSError:
                inside.close()
                continue
            for s in (inside, outside):
                # Small writes (a keystroke's echo) leave at once, as on a direct connection.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conns.extend((inside, outside))
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield
    finally:
        stop.set()
        server.join()
        listener.close()
        for c in conns:
            c.close()


@contextlib.contextmanager
def chromium(ca: Path, *ports: int, name: str = "denbench") -> Iterator[Browser]:
    """Headless Chromium trusting ``ca``, reaching the host's 127.0.0.1 at ``ports``, in
    the network namespace ``name``+pid; the namespace, the profile and the browser are
    gone after, whatever happened (the web tests' browser too)."""
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"{CHROMIUM} is missing: run `make bench-deps`")
    with tempfile.TemporaryDirectory(prefix="den-bench-chromium-") as tmp:
        home = Path(tmp)
        nss = home / ".pki" / "nssdb"
        nss.mkdir(parents=True)
        db = f"sql:{nss}"
        subprocess.run(["certutil", "-N", "-d", db, "--empty-password"], check=True)
        subprocess.run(
            ["certutil", "-A", "-d", db, "-n", "den root", "-t", "C,,", "-i", str(ca)],
            check=True,
        )
        netns = f"{name}{os.getpid()}"
        launcher = home / "chromium"
        launcher.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {CHROMIUM} "$@"\n')
        launcher.chmod(0o755)
        subprocess.run(["ip", "netns", "add", netns], check=True)
        try:
            subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
            env: dict[str, str | float | bool] = {**os.environ, "HOME": str(home)}
            with contextlib.ExitStack() as stack:
                for port in ports:
                    stack.enter_context(relay(listen_in_netns(netns, port), port))
                p = stack.enter_context(sync_playwright())
                b = p.chromium.launch(executable_path=str(launcher), args=["--no-sandbox"], env=env)
                try:
                    yield b
                finally:
                    b.close()
        finally:
            subprocess.run(["ip", "netns", "delete", netns], check=False)
