"""JSON-RPC 2.0 over HTTP on the unix socket, against the real daemon.

The cases follow the examples section of the JSON-RPC 2.0 specification
(https://www.jsonrpc.org/specification#examples), with den's methods in place
of the specification's ``subtract``/``sum``, and then den's own error codes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from den.cli.client import Client
from tests.conftest import Daemon

LIMIT = 1 << 20

INVALID_REQUEST = {
    "jsonrpc": "2.0",
    "error": {"code": -32600, "message": "Invalid Request"},
    "id": None,
}
PARSE_ERROR = {"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": None}


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    c = daemon.client()
    try:
        yield c
    finally:
        c.close()


def post(client: Client, body: Any) -> tuple[int, Any]:
    """POST ``body`` (bytes as they are, anything else as JSON); return status and JSON."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    status, out = client.post(raw)
    return status, (orjson.loads(out) if out else None)


def req(method: str, params: Any = None, id: Any = 1) -> dict[str, Any]:
    r: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
    if params is not None:
        r["params"] = params
    return r


@pytest.fixture
def user(daemon: Daemon, name: str) -> Iterator[str]:
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        daemon.call("user.delete", name=name)


# -- the specification's examples ------------------------------------------------


def test_positional_params(client: Client, user: str) -> None:
    status, resp = post(client, req("user.get", [user], id=1))
    assert status == 200
    assert resp["jsonrpc"] == "2.0" and resp["id"] == 1 and "error" not in resp
    assert resp["result"]["name"] == user


def test_named_params(client: Client, user: str) -> None:
    status, resp = post(client, req("user.get", {"name": user}, id=2))
    assert status == 200
    assert set(resp) == {"jsonrpc", "result", "id"}
    assert resp["result"]["name"] == user and resp["id"] == 2


def test_too_many_positional_params(client: Client, user: str) -> None:
    _, resp = post(client, req("user.get", [user, "extra"], id=3))
    assert resp["id"] == 3
    assert resp["error"]["code"] == -32602
    assert resp["error"]["message"] == "Invalid params"
    assert "positional" in resp["error"]["data"]["errors"][0]["message"]


@pytest.mark.parametrize("req_id", ["abc", 7, 0, -5, 1.5, ""])
def test_id_is_echoed(client: Client, req_id: Any) -> None:
    _, resp = post(client, req("rpc.health", id=req_id))
    assert resp["id"] == req_id and type(resp["id"]) is type(req_id)
    assert resp["result"]["status"] == "ok"


def test_null_id_is_answered(client: Client) -> None:
    _, resp = post(client, req("rpc.health", id=None))
    assert resp["id"] is None and resp["result"]["status"] == "ok"


@pytest.mark.parametrize("bad_id", [{"a": 1}, [1], True])
def test_invalid_id(client: Client, bad_id: Any) -> None:
    _, resp = post(client, req("rpc.health", id=bad_id))
    assert resp["id"] is None
    assert resp["error"]["code"] == -32600


def test_notification_gets_no_response(client: Client) -> None:
    status, out = client.post(b'{"jsonrpc": "2.0", "method": "rpc.health"}')
    assert (status, out) == (204, b"")


def test_notification_of_unknown_method_gets_no_response(client: Client) -> None:
    status, out = client.post(b'{"jsonrpc": "2.0", "method": "foobar", "params": [1]}')
    assert (status, out) == (204, b"")


def test_notification_with_invalid_params_gets_no_response(client: Client) -> None:
    status, out = client.post(b'{"jsonrpc": "2.0", "method": "user.get", "params": {"name": 5}}')
    assert (status, out) == (204, b"")


def test_method_not_found(client: Client) -> None:
    _, resp = post(client, {"jsonrpc": "2.0", "method": "foobar", "id": "1"})
    assert resp == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": "Method not found", "data": {"method": "foobar"}},
        "id": "1",
    }


def test_parse_error(client: Client) -> None:
    status, resp = post(client, b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert status == 200
    assert resp == PARSE_ERROR


@pytest.mark.parametrize("body", [b"", b"   ", b"\xff\xfe", b"{", b"nul", b"[1,]"])
def test_parse_error_variants(client: Client, body: bytes) -> None:
    _, resp = post(client, body)
    assert resp == PARSE_ERROR


def test_invalid_request_object(client: Client) -> None:
    # The specification's example: method not a string, params a string, no id.
    _, resp = post(client, {"jsonrpc": "2.0", "method": 1, "params": "bar"})
    assert resp == INVALID_REQUEST


@pytest.mark.parametrize(
    "request_obj",
    [
        {"jsonrpc": "1.0", "method": "rpc.health", "id": 1},
        {"jsonrpc": 2.0, "method": "rpc.health", "id": 1},
        {"method": "rpc.health", "id": 1},
        {"jsonrpc": "2.0", "method": 1, "id": 1},
        {"jsonrpc": "2.0", "method": None, "id": 1},
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "method": "rpc.health", "params": "bar", "id": 1},
        {"jsonrpc": "2.0", "method": "rpc.health", "params": 3, "id": 1},
        {"jsonrpc": "2.0", "method": "rpc.health", "params": None, "id": 1},
    ],
    ids=[
        "version-1.0",
        "version-number",
        "no-version",
        "method-int",
        "method-null",
        "no-method",
        "params-string",
        "params-int",
        "params-null",
    ],
)
def test_invalid_request_variants(client: Client, request_obj: dict[str, Any]) -> None:
    status, resp = post(client, request_obj)
    assert status == 200
    # The id could be read, so it is echoed; the error is the standard one.
    assert resp == {**INVALID_REQUEST, "id": 1}


@pytest.mark.parametrize("body", [b"1", b'"x"', b"null", b"true", b"{}"])
def test_non_object_request(client: Client, body: bytes) -> None:
    _, resp = post(client, body)
    assert resp == INVALID_REQUEST


def test_batch_with_invalid_json(client: Client) -> None:
    body = (
        b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
        b'{"jsonrpc": "2.0", "method" ]'
    )
    _, resp = post(client, body)
    assert resp == PARSE_ERROR


def test_empty_batch(client: Client) -> None:
    status, resp = post(client, b"[]")
    assert status == 200
    assert resp == INVALID_REQUEST  # one object, not an array


def test_batch_of_one_invalid(client: Client) -> None:
    _, resp = post(client, b"[1]")
    assert resp == [INVALID_REQUEST]


def test_batch_of_invalids(client: Client) -> None:
    _, resp = post(client, b"[1,2,3]")
    assert resp == [INVALID_REQUEST] * 3


def test_mixed_batch(client: Client, user: str) -> None:
    batch = [
        req("rpc.health", id="1"),
        {"jsonrpc": "2.0", "method": "rpc.health", "params": []},  # notification
        req("user.get", [user], id="2"),
        {"foo": "boo"},
        req("foo.get", {"name": "myself"}, id="5"),
        req("user.get", {"name": 5}, id="6"),
        req("auth.whoami", id="9"),
    ]
    status, resp = post(client, batch)
    assert status == 200
    assert isinstance(resp, list)
    assert len(resp) == 6  # every request but the notification
    by_id = {r["id"]: r for r in resp if r["id"] is not None}
    assert set(by_id) == {"1", "2", "5", "6", "9"}
    assert by_id["1"]["result"]["status"] == "ok"
    assert by_id["2"]["result"]["name"] == user
    assert by_id["5"] == {
        "jsonrpc": "2.0",
        "error": {"code": -32601, "message": "Method not found", "data": {"method": "foo.get"}},
        "id": "5",
    }
    assert by_id["6"]["error"]["code"] == -32602
    assert by_id["6"]["error"]["message"] == "Invalid params"
    assert by_id["9"]["result"]["name"] == "root"
    nulls = [r for r in resp if r["id"] is None]
    assert nulls == [INVALID_REQUEST]
    for r in resp:
        assert r["jsonrpc"] == "2.0"
        assert ("result" in r) != ("error" in r)


def test_batch_of_notifications(client: Client) -> None:
    body = orjson.dumps(
        [
            {"jsonrpc": "2.0", "method": "rpc.health", "params": [1, 2, 4]},
            {"jsonrpc": "2.0", "method": "rpc.health"},
            {"jsonrpc": "2.0", "method": "no.such.method"},
        ]
    )
    status, out = client.post(body)
    assert (status, out) == (204, b"")


def test_notification_still_runs(daemon: Daemon, client: Client, name: str) -> None:
    """A notification gets no response, but the call is made."""
    body = orjson.dumps({"jsonrpc": "2.0", "method": "user.create", "params": {"name": name}})
    try:
        assert client.post(body) == (204, b"")
        assert daemon.call("user.get", name=name)["name"] == name
    finally:
        daemon.call("user.delete", name=name)


# -- invalid params ----------------------------------------------------------------


def _errors(resp: dict[str, Any]) -> list[dict[str, str]]:
    assert resp["error"]["code"] == -32602, resp
    assert resp["error"]["message"] == "Invalid params"
    errors = resp["error"]["data"]["errors"]
    assert errors and all(set(e) == {"field", "message"} for e in errors)
    return errors


def test_invalid_params_wrong_type(client: Client) -> None:
    _, resp = post(client, req("user.get", {"name": 12345}))
    assert _errors(resp) == [{"field": "name", "message": "Input should be a valid string"}]


def test_invalid_params_wrong_types_all_listed(client: Client) -> None:
    params = {"limit": "many", "actor": ["x"], "since": 3}
    _, resp = post(client, req("audit.list", params))
    fields = {e["field"] for e in _errors(resp)}
    assert fields == {"limit", "actor", "since"}


def test_invalid_params_unknown_field(client: Client, user: str) -> None:
    secret = "s3cr3t-value-never-echoed"
    _, resp = post(client, req("user.get", {"name": user, "bogus": secret}))
    assert _errors(resp) == [{"field": "bogus", "message": "unknown field"}]
    assert secret not in orjson.dumps(resp).decode()


def test_invalid_params_missing_field(client: Client) -> None:
    _, resp = post(client, req("user.get", {}))
    assert _errors(resp) == [{"field": "name", "message": "Field required"}]
    _, resp = post(client, req("user.get"))
    assert _errors(resp) == [{"field": "name", "message": "Field required"}]


def test_invalid_params_bad_value(client: Client) -> None:
    _, resp = post(client, req("token.create", {"right": "godmode", "user": "nobody"}))
    errors = _errors(resp)
    assert [e["field"] for e in errors] == ["right"]
    assert "godmode" not in orjson.dumps(resp).decode()


@pytest.mark.parametrize(
    "value", ["NOT-A-VALID-NAME-marker", "x" * 5000, "a;rm -rf /marker", {"nested": "marker"}]
)
def test_invalid_params_never_echo_input(client: Client, value: Any) -> None:
    _, resp = post(client, req("user.get", {"name": value}))
    errors = _errors(resp)
    assert errors[0]["field"] == "name"
    text = orjson.dumps(resp).decode()
    assert "marker" not in text and "xxxxx" not in text


# -- body size -----------------------------------------------------------------------


def test_body_over_limit(client: Client) -> None:
    body = b'{"jsonrpc":"2.0","method":"rpc.health","id":1}' + b" " * LIMIT
    status, resp = post(client, body)
    assert status == 413
    assert resp["jsonrpc"] == "2.0" and resp["id"] is None
    assert resp["error"]["code"] == -32600
    assert resp["error"]["message"] == "Invalid Request"
    assert str(LIMIT) in resp["error"]["data"]["reason"]
    assert "limit" in resp["error"]["data"]["reason"]


def test_body_at_limit_is_accepted(client: Client) -> None:
    head = b'{"jsonrpc":"2.0","method":"rpc.health","id":1}'
    status, resp = post(client, head + b" " * (LIMIT - len(head)))
    assert status == 200 and resp["result"]["status"] == "ok"
    status, resp = post(client, head + b" " * (LIMIT - len(head) + 1))
    assert status == 413


def test_chunked_body_over_limit(daemon: Daemon) -> None:
    """Without a Content-Length the limit still holds while the body streams in."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(daemon.socket))
    try:
        sock.sendall(
            b"POST /rpc HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        chunk = b" " * 65536
        try:
            for _ in range(LIMIT // len(chunk) + 2):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before we are done
        data = b""
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"-32600" in body and str(LIMIT).encode() in body


# -- den's own error codes -------------------------------------------------------


def test_not_found(client: Client) -> None:
    _, resp = post(client, req("user.get", {"name": "no-such-user"}, id=11))
    assert resp["id"] == 11
    assert resp["error"]["code"] == -32001
    assert "no-such-user" in resp["error"]["message"]


def test_conflict(client: Client, user: str) -> None:
    _, resp = post(client, req("user.create", {"name": user}, id=12))
    assert resp["id"] == 12
    assert resp["error"]["code"] == -32002
    assert "exists" in resp["error"]["message"]


def test_forbidden(daemon: Daemon, user: str) -> None:
    resp = daemon.call_as(user, "user.create", {"name": "someone-else"})
    assert resp["error"]["code"] == -32003
    assert "admin" in resp["error"]["message"]
    assert "error" in daemon.call_as(user, "user.get", {"name": "someone-else"})
    assert daemon.error("user.get", name="someone-else").code == -32001


def test_unauthenticated_without_token(daemon: Daemon) -> None:
    c = daemon.client(tcp=True)
    try:
        status, resp = post(c, req("user.list", id=13))
        assert status == 200
        assert resp["id"] == 13 and resp["error"]["code"] == -32006
        # Public methods need no identity.
        _, resp = post(c, req("rpc.health"))
        assert resp["result"]["status"] == "ok"
    finally:
        c.close()


def test_unauthenticated_bad_token(daemon: Daemon) -> None:
    c = daemon.client(token="den_0000_not-a-real-secret", tcp=True)
    try:
        status, resp = post(c, req("user.list", id=14))
        assert status == 401
        assert resp["error"]["code"] == -32006
        assert "unknown token" in resp["error"]["message"]
    finally:
        c.close()


def test_keep_alive_survives_errors(client: Client) -> None:
    """One connection carries many requests, whatever their outcome."""
    for body in (b"{", b"[]", orjson.dumps(req("nope")), orjson.dumps(req("rpc.health"))):
        status, _ = client.post(body)
        assert status == 200
    _, resp = post(client, req("rpc.health"))
    assert resp["result"]["status"] == "ok"
