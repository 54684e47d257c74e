"""den's MCP server with the official SDK's own client: streamable HTTP at /mcp on
den's TCP listener and through Caddy, and `den mcp` over stdio."""

from __future__ import annotations

import asyncio
import grp
import json
import pwd
import secrets
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import mcp_types as types
import pytest
from mcp.client.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import DEN, Daemon
from tests.web.conftest import Web
from tests.workspaces.conftest import make_users


@dataclass
class Member:
    name: str
    write: str  # a write-right token
    read: str  # a read-right token
    image: str


@pytest.fixture(scope="module")
def member(pool_daemon: Daemon, web_bb: str) -> Iterator[Member]:
    with make_users(pool_daemon) as users:
        name = users.make()
        write = pool_daemon.call("token.create", user=name, right="write")["token"]
        read = pool_daemon.call("token.create", user=name, right="read")["token"]
        yield Member(name, write, read, web_bb)


Logs = list[tuple[str | None, Any]]


def logger_of(logs: Logs) -> Any:
    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append((params.logger, params.data))

    return on_log


def http_client(
    d: Daemon, token: str | None, mode: str = "auto", logs: Logs | None = None
) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    http = httpx2.AsyncClient(headers=headers, timeout=120)
    return Client(
        streamable_http_client(d.http_url + "/mcp", http_client=http),
        mode=mode,
        logging_callback=logger_of(logs if logs is not None else []),
        log_level="info",
    )


def text(res: types.CallToolResult) -> Any:
    assert res.content and isinstance(res.content[0], types.TextContent), res
    return res.content[0].text


def ok(res: types.CallToolResult) -> Any:
    assert not res.is_error, text(res)
    return json.loads(text(res))


def run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), 300))


def audit(d: Daemon, **params: Any) -> list[dict[str, Any]]:
    c = d.client()
    try:
        return list(c.call("audit.list", params))
    finally:
        c.close()


def names(tools: types.ListToolsResult) -> set[str]:
    return {t.name for t in tools.tools}


async def exercise(client: Client, m: Member, ws: str, logs: Logs) -> None:
    """What any MCP client does with den: list, read, create, stream, files."""
    tools = await client.list_tools()
    listed = names(tools)
    assert {"workspace.list", "workspace.create", "workspace.exec_stream"} <= listed
    assert {"workspace.read_file", "workspace.write_file"} <= listed
    assert "user.create" not in listed  # admins only: never callable, never listed
    create_tool = next(t for t in tools.tools if t.name == "workspace.create")
    assert "name" in create_tool.input_schema["properties"]
    assert "name" in create_tool.input_schema["required"]
    assert create_tool.description and create_tool.description.startswith("Create a workspace")

    out = ok(await client.call_tool("workspace.create", {"name": ws, "image": m.image}))
    assert out["name"] == ws and out["state"] == "running"
    listing = ok(await client.call_tool("workspace.list", {}))
    assert ws in [w["name"] for w in listing]

    # Streaming: each line arrives as progress while the command still runs (it
    # waits for a file only the progress callback creates after the first line).
    seen: list[str] = []
    flag = f"/tmp/go{secrets.token_hex(2)}"

    go_on: list[asyncio.Task[Any]] = []

    async def release() -> None:
        ok(await client.call_tool("workspace.write_file", {"ref": ws, "path": flag, "content": ""}))

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")
        if not go_on:  # a call of its own: this callback must not wait on the connection
            go_on.append(asyncio.create_task(release()))

    script = f"echo one; while [ ! -e {flag} ]; do sleep 0.05; done; echo two; echo err >&2; cat"
    res = await client.call_tool(
        "workspace.exec_stream",
        {"ref": ws, "argv": ["sh", "-c", script], "stdin": "three\n"},
        progress_callback=progress,
    )
    out = ok(res)
    await go_on[0]
    assert out["exit_code"] == 0 and out["signal"] is None
    assert out["stdout"] == "one\ntwo\nthree\n" and out["stderr"] == "err\n"
    assert seen[0] == "one\n" and "".join(seen).count("two") == 1
    assert "[stderr] err\n" in seen

    # Without a progress token the chunks come as log messages, a logger per stream.
    out = ok(
        await client.call_tool(
            "workspace.exec_stream", {"ref": ws, "argv": ["sh", "-c", "echo out; echo bad >&2"]}
        )
    )
    assert out["stdout"] == "out\n" and ("stdout", "out\n") in logs and ("stderr", "bad\n") in logs

    # A cancelled call kills its command.
    pidfile = f"/tmp/pid{secrets.token_hex(2)}"
    argv = ["sh", "-c", f"echo $$ > {pidfile}; echo started; exec sleep 1000"]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            client.call_tool("workspace.exec_stream", {"ref": ws, "argv": argv}), 3
        )
    alive = f"kill -0 $(cat {pidfile}) 2>/dev/null && echo alive || echo gone"
    for _ in range(100):
        res = ok(await client.call_tool("workspace.exec", {"ref": ws, "argv": ["sh", "-c", alive]}))
        if res["stdout"].strip() == "gone":
            break
        await asyncio.sleep(0.1)
    assert res["stdout"].strip() == "gone"

    # Files inside the workspace, as its user: a round trip, and clear refusals.
    body = "héllo\nden\n"
    path = f"notes{secrets.token_hex(2)}.txt"
    assert ok(
        await client.call_tool("workspace.write_file", {"ref": ws, "path": path, "content": body})
    )["bytes"] == len(body.encode())
    got = ok(await client.call_tool("workspace.read_file", {"ref": ws, "path": path}))
    assert got["content"] == body
    # Written by the workspace's own user (as workspace.exec runs), never by the host.
    script = f"stat -c %U {path}; id -un"
    owner = ok(await client.call_tool("workspace.exec", {"ref": ws, "argv": ["sh", "-c", script]}))
    file_user, exec_user = owner["stdout"].split()
    assert file_user == exec_user
    missing = await client.call_tool("workspace.read_file", {"ref": ws, "path": "/nope"})
    assert missing.is_error and "-32602" in text(missing) and "/nope" in text(missing)
    big = await client.call_tool(
        "workspace.exec", {"ref": ws, "argv": ["sh", "-c", "head -c 2000000 /dev/zero > big"]}
    )
    assert ok(big)["exit_code"] == 0
    too_big = await client.call_tool("workspace.read_file", {"ref": ws, "path": "big"})
    assert too_big.is_error and "2000000 bytes" in text(too_big) and "at most" in text(too_big)


def test_http_with_a_token(pool_daemon: Daemon, member: Member) -> None:
    d, m = pool_daemon, member
    ws = f"h{secrets.token_hex(2)}"

    async def go() -> None:
        logs: Logs = []
        async with http_client(d, m.write, logs=logs) as client:
            await exercise(client, m, ws, logs)

    run(go)
    # Audited like any call, as the token's user, over TCP.
    events = audit(d, actor=m.name, method="workspace.create")
    assert [e["target"] for e in events] == [f"workspace:{m.name}/{ws}"]
    assert events[0]["via"] == "tcp" and events[0]["outcome"] == "ok"
    streamed = audit(d, actor=m.name, method="workspace.exec_stream")
    assert streamed and streamed[0]["target"] == f"workspace:{m.name}/{ws}"


def test_read_token_and_strangers(pool_daemon: Daemon, member: Member) -> None:
    d, m = pool_daemon, member

    async def go() -> None:
        async with http_client(d, m.read, mode="legacy") as client:
            listed = names(await client.list_tools())
            assert "workspace.list" in listed
            assert not {"workspace.create", "workspace.exec", "workspace.read_file"} & listed
            res = await client.call_tool("workspace.create", {"name": "nope", "image": m.image})
            assert res.is_error and res.structured_content is not None
            assert res.structured_content["error"]["code"] == -32003
            assert "'write' right" in res.structured_content["error"]["message"]
            res = await client.call_tool(
                "workspace.write_file", {"ref": "any", "path": "x", "content": ""}
            )
            assert res.is_error and res.structured_content["error"]["code"] == -32003
        async with httpx2.AsyncClient(timeout=30) as raw:
            init = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"},
                },
            }
            hdrs = {"Accept": "application/json, text/event-stream"}
            r = await raw.post(d.http_url + "/mcp", json=init, headers=hdrs)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
            bad = {**hdrs, "Authorization": "Bearer den_nope_nope"}
            r = await raw.post(d.http_url + "/mcp", json=init, headers=bad)
            assert r.status_code == 401
            # A session is its opener's: another credential gets "not found".
            r = await raw.post(
                d.http_url + "/mcp",
                json=init,
                headers={**hdrs, "Authorization": f"Bearer {m.write}"},
            )
            assert r.status_code == 200, r.text
            sid = r.headers["mcp-session-id"]
            listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
            other = {
                **hdrs,
                "Authorization": f"Bearer {m.read}",
                "mcp-session-id": sid,
                "mcp-protocol-version": "2025-06-18",
            }
            r = await raw.post(d.http_url + "/mcp", json=listing, headers=other)
            assert r.status_code == 404

    run(go)


class Loopback(httpx2.AsyncHTTPTransport):
    """den.localhost is loopback, but Python asks DNS: dial 127.0.0.1, the name in
    TLS (SNI, the certificate check) and in Host."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.host.endswith(".localhost"):
            request.extensions = {**request.extensions, "sni_hostname": request.url.host}
            request.url = request.url.copy_with(host="127.0.0.1")
        return await super().handle_async_request(request)


def test_through_caddy(member: Member, web: Web) -> None:
    m = member
    ctx = ssl.create_default_context(cafile=str(web.ca))

    async def go() -> None:
        transport = Loopback(verify=ctx)
        async with httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {m.write}"},
            verify=ctx,
            timeout=60,
            transport=transport,
        ) as http:
            url = web.home + "mcp"
            async with Client(streamable_http_client(url, http_client=http)) as client:
                assert "workspace.create" in names(await client.list_tools())
                listing = ok(await client.call_tool("workspace.list", {}))
                assert isinstance(listing, list)
        async with httpx2.AsyncClient(transport=Loopback(verify=ctx), timeout=30) as raw:
            r = await raw.post(web.home + "mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")

    run(go)


def test_stdio(pool_daemon: Daemon, member: Member) -> None:
    """`den mcp` as the member's own host account: the daemon knows them by the
    socket's peer credentials, with no token at all."""
    d, m = pool_daemon, member
    ws = f"s{secrets.token_hex(2)}"
    pw = pwd.getpwnam(d.prefix + m.name)
    gid = grp.getgrnam(d.group).gr_gid
    params = StdioServerParameters(
        command="setpriv",
        args=[f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", f"--groups={gid}", "--", DEN, "mcp"],
        env={**d.env, "HOME": str(d.base)},
    )

    async def go() -> None:
        logs: Logs = []
        async with Client(params, logging_callback=logger_of(logs), log_level="info") as client:
            await exercise(client, m, ws, logs)

    run(go)
    events = audit(d, actor=m.name, method="workspace.exec_stream")
    assert any(e["via"] == "unix" for e in events)


def test_a_member_cannot_take_every_session(pool_daemon: Daemon, member: Member) -> None:
    """Sessions are capped per user (the SDK's cap is one for all): a member opening
    session after session is refused, others still open theirs."""
    from den.mcp.http import SESSIONS_PER_USER

    d = pool_daemon
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    hdrs = {"Accept": "application/json, text/event-stream"}

    async def go(m: Member) -> None:
        async with httpx2.AsyncClient(timeout=30) as raw:

            async def open_one(token: str) -> httpx2.Response:
                auth = {**hdrs, "Authorization": f"Bearer {token}"}
                return await raw.post(d.http_url + "/mcp", json=init, headers=auth)

            async def close(sid: str, token: str) -> None:
                await raw.delete(
                    d.http_url + "/mcp",
                    headers={"Authorization": f"Bearer {token}", "mcp-session-id": sid},
                )

            opened: list[tuple[str, str]] = []
            try:
                for i in range(SESSIONS_PER_USER):
                    token = m.write if i % 2 else m.read  # all tokens of a user count
                    r = await open_one(token)
                    assert r.status_code == 200, r.text
                    opened.append((r.headers["mcp-session-id"], token))
                r = await open_one(m.write)
                assert r.status_code == 429, r.text
                assert "sessions" in r.json()["error"]["message"]
                with make_users(d) as users:
                    other = users.make()
                    tok = d.call("token.create", user=other, right="read")["token"]
                    r = await open_one(tok)
                    assert r.status_code == 200, r.text
                    await close(r.headers["mcp-session-id"], tok)
                # one closed: room for one more
                sid, token = opened.pop()
                await close(sid, token)
                r = await open_one(m.write)
                assert r.status_code == 200, r.text
                opened.append((r.headers["mcp-session-id"], m.write))
            finally:
                for sid, token in opened:
                    await close(sid, token)

    with make_users(d) as users:  # a user of its own: no session open before
        name = users.make()
        write = d.call("token.create", user=name, right="write")["token"]
        read = d.call("token.create", user=name, right="read")["token"]
        run(lambda: go(Member(name, write, read, member.image)))
