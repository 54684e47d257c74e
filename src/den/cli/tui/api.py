"""How ``den tui`` talks to den: the CLI's client, one per thread, and the ssh command."""

from __future__ import annotations

import http.client
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from den.cli.client import Client, ConnectError, RpcError

# Everything a call may fail with that the user should read (as a notification):
# den's refusal, den unreachable, a connection broken mid-answer.
CallError = (RpcError, ConnectError, OSError, http.client.HTTPException)


class Api:
    """Calls registered methods through the CLI's client.

    http.client connections are not safe to share between threads, and every
    call runs in a worker thread (the UI never waits on the network): each
    thread gets a client of its own, made by ``connect``.
    """

    def __init__(self, base: Client) -> None:
        self.base = base
        self._local = threading.local()
        self._clients: list[Client] = []
        self._lock = threading.Lock()

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        client: Client | None = getattr(self._local, "client", None)
        if client is None:
            b = self.base
            client = self._local.client = Client(b.socket_path, b.url, b.token, b.timeout)
            with self._lock:
                self._clients.append(client)
        return client.call(method, params or {})

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()


def ssh_login(me: str, owner: str, name: str) -> str:
    """The login name the gateway takes into ``owner``'s workspace ``name``
    (den.ssh.target: NAME for the caller's own, OWNER.NAME for another's)."""
    return name if owner == me else f"{owner}.{name}"


def ssh_command(info: dict[str, Any], url: str | None, me: str, owner: str, name: str) -> list[str]:
    """The ssh command line into a workspace, from ``system.info``.

    Over TCP the host is the one the API is reached at (the gateway is on the same
    machine); over the unix socket it is the daemon's own host name.
    """
    host = (urlsplit(url).hostname if url else None) or str(info["host"])
    return ["ssh", "-p", str(info["ssh_port"]), f"{ssh_login(me, owner, name)}@{host}"]


Runner = Callable[[Sequence[str]], int]


def run_foreground(argv: Sequence[str]) -> int:
    """Run a program on the terminal the TUI hands over; its exit status.

    Not den.proc.run: that captures output, and ssh needs the terminal itself.
    """
    return subprocess.run(list(argv), check=False).returncode
