"""A small JSON-RPC client for the CLI, over the unix socket or HTTP(S)."""

from __future__ import annotations

import http.client
import itertools
import socket
from typing import Any
from urllib.parse import urlsplit

import orjson


class RpcError(Exception):
    """An error object returned by the server."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def __str__(self) -> str:
        text = self.message
        if isinstance(self.data, dict):
            errors = self.data.get("errors")
            if isinstance(errors, list):
                parts = [
                    f"{e.get('field')}: {e.get('message')}"
                    if e.get("field")
                    else str(e.get("message"))
                    for e in errors
                    if isinstance(e, dict)
                ]
                text += ": " + "; ".join(parts)
            elif "reason" in self.data:
                text += f": {self.data['reason']}"
            elif "method" in self.data:
                text += f": {self.data['method']}"
        return text


class ConnectError(Exception):
    """The daemon could not be reached."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class Client:
    """Calls methods on a den daemon; keeps one connection open."""

    def __init__(
        self,
        socket_path: str | None = None,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.socket_path = socket_path
        self.url = url
        self.token = token
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.url:
                parts = urlsplit(self.url)
                cls = (
                    http.client.HTTPSConnection
                    if parts.scheme == "https"
                    else http.client.HTTPConnection
                )
                self._conn = cls(parts.netloc, timeout=self.timeout)
            else:
                assert self.socket_path
                self._conn = _UnixConnection(self.socket_path, self.timeout)
        return self._conn

    @property
    def where(self) -> str:
        return self.url or f"unix:{self.socket_path}"

    def post(self, body: bytes) -> tuple[int, bytes]:
        """POST a raw body to /rpc; return the HTTP status and body."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        path = "/rpc"
        if self.url:
            path = urlsplit(self.url).path.rstrip("/") + "/rpc"
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                self.close()
                if attempt:
                    raise ConnectError(f"den at {self.where} closed the connection") from None
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                self.close()
                raise ConnectError(
                    f"cannot reach den at {self.where} ({exc.strerror}); is `den serve` running?"
                ) from None
            except PermissionError:
                self.close()
                raise ConnectError(
                    f"no permission to use {self.where}: run as root or as a den user's account"
                ) from None
        raise AssertionError("unreachable")

    def call(self, method: str, params: dict[str, Any] | list[Any] | None = None) -> Any:
        req: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(self._ids)}
        if params is not None:
            req["params"] = params
        status, body = self.post(orjson.dumps(req))
        try:
            resp = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ConnectError(f"den answered HTTP {status} with a body that is not JSON") from None
        if "error" in resp:
            err = resp["error"]
            raise RpcError(err.get("code", 0), err.get("message", ""), err.get("data"))
        return resp.get("result")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
