"""/metrics is for admins; failed API authentications are held off per address."""

from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request

from den.rpc.authlimit import AuthFailures
from tests.conftest import Daemon, running_daemon


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def get_unix(d: Daemon, path: str) -> tuple[int, str]:
    """GET ``path`` over the daemon's unix socket, as the calling host user."""
    conn = _UnixConnection(str(d.socket))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def http_get(d: Daemon, path: str, token: str | None = None) -> tuple[int, dict[str, str], str]:
    """GET ``path`` over TCP with an optional bearer token: (status, headers, body)."""
    req = urllib.request.Request(d.http_url + path)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()


def metrics_text(d: Daemon) -> str:
    """The Prometheus text, fetched as root over the unix socket."""
    status, body = get_unix(d, "/metrics")
    assert status == 200, body
    return body


def rpc(d: Daemon, token: str, method: str) -> tuple[int, dict[str, str], dict[str, object]]:
    req = urllib.request.Request(
        d.http_url + "/rpc",
        data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_metrics_needs_an_admin(daemon: Daemon, name: str) -> None:
    d = daemon
    admin, member = f"{name}a", f"{name}m"
    d.call("user.create", name=admin, role="admin")
    d.call("user.create", name=member)
    admin_token = d.call("token.create", user=admin, right="admin")["token"]
    admin_read = d.call("token.create", user=admin, right="read")["token"]
    member_token = d.call("token.create", user=member)["token"]

    status, headers, body = http_get(d, "/metrics")
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer", body
    assert json.loads(body)["error"]["code"] == -32006
    for token in (member_token, admin_read):
        status, _, body = http_get(d, "/metrics", token)
        assert status == 403 and json.loads(body)["error"]["code"] == -32003, body
    status, _, body = http_get(d, "/metrics", admin_token)
    assert status == 200 and "den_rpc_calls" in body
    # Root on the unix socket is an admin; a member's host account is not.
    assert "den_rpc_calls" in metrics_text(d)


def test_failed_authentications_are_held_off_per_address() -> None:
    with running_daemon(
        {"DEN_API_MAX_AUTH_FAILURES": "3", "DEN_API_AUTH_FAILURE_WINDOW": "60"}
    ) as d:
        d.call("user.create", name="holder")
        good = d.call("token.create", user="holder")["token"]
        bad = good[:-4] + ("aaaa" if not good.endswith("aaaa") else "bbbb")
        for _ in range(3):
            status, headers, body = rpc(d, bad, "auth.whoami")
            assert status == 401 and "Retry-After" not in headers, body
        for _ in range(2):
            status, headers, body = rpc(d, bad, "auth.whoami")
            assert status == 429, body
            err = body["error"]
            assert isinstance(err, dict) and err["code"] == -32006, body
            wait = int(headers["Retry-After"])
            assert 1 <= wait <= 60 and err["data"] == {"retry_after": wait}
        # /metrics counts as an authentication too.
        status, headers, _ = http_get(d, "/metrics", bad)
        assert status == 429 and "Retry-After" in headers
        # A client with a valid token behind the same address is not locked out.
        status, _, body = rpc(d, good, "auth.whoami")
        assert status == 200 and body["result"], body


def test_failure_table_is_bounded() -> None:
    table = AuthFailures(limit=2, window=60, max_entries=100)
    for i in range(5000):
        table.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(table) == 100
    table.failed("a")
    table.failed("a")
    assert 59 <= table.retry_after("a") <= 60
    assert table.retry_after("b") == 0
