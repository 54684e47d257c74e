"""The LLM gateway: providers an admin adds, reached from inside a workspace at
http://169.254.169.254/v1 with the workspace's token, budgets, and the
provider key kept out of the workspace, the log and the audit log.

The upstream is a small OpenAI-compatible server this test runs on loopback:
it answers only to the provider key, reports usage, and streams SSE.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from den.cli.client import RpcError
from tests.conftest import Daemon
from tests.workspaces.conftest import Users

USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
META = "http://169.254.169.254"


class FakeProvider:
    """An OpenAI-compatible upstream on 127.0.0.1 (a real HTTP server in a thread)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.seen: list[dict[str, Any]] = []  # bodies of the requests it accepted
        self.bad_auth = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            self.bad_auth += 1
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        self.seen.append(body)
        if body["model"].endswith("-leaky"):
            # Some providers quote the key they were sent in their errors.
            msg = f"model overloaded for key {self.key}"
            return web.json_response({"error": {"message": msg}}, status=400)
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}],
                    "usage": USAGE,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in ("str", "eam", "ed"):
            chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": word}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.05)
        if (body.get("stream_options") or {}).get("include_usage"):
            last = {"object": "chat.completion.chunk", "choices": [], "usage": USAGE}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            self.bad_auth += 1
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        self.seen.append(await request.json())
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        )


@pytest.fixture(scope="module")
def provider(pool_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The fake upstream, added to den as a provider (by the CLI, key from a file)."""
    d = pool_daemon
    key = "sk-test-" + secrets.token_hex(16)
    up = FakeProvider(key)
    up.start()
    name = f"p{secrets.token_hex(3)}"
    models = [f"{name}-chat", f"{name}-leaky", f"{name}-embed"]
    key_file = tmp_path_factory.mktemp("llm") / "key"
    key_file.write_text(key + "\n")
    try:
        d.cli(
            "llm", "provider", "add", name, "--base-url", up.url, "--key-file", str(key_file),
            "--models", ",".join(models), check=True,
        )  # fmt: skip
        yield type("P", (), {"name": name, "key": key, "up": up, "models": models})
    finally:
        with contextlib.suppress(RpcError):
            d.call("llm.provider.rm", name=name)
        up.stop()


def test_providers_are_admins_and_keys_stay_sealed(
    pool_daemon: Daemon, provider: Any, users: Users, tmp_path: Path
) -> None:
    d = pool_daemon
    listed = {p["name"]: p for p in d.call("llm.provider.ls")}
    assert listed[provider.name]["models"] == provider.models
    assert listed[provider.name]["base_url"] == provider.up.url
    assert provider.key not in json.dumps(listed)
    # Stored sealed: not in the database file in clear.
    assert provider.key.encode() not in (d.data_dir / "den.db").read_bytes()

    member = users.make()
    key_file = tmp_path / "k"
    key_file.write_text("sk-member")
    key_file.chmod(0o644)
    res = d.cli(
        "llm", "provider", "add", "mine", "--base-url", "http://127.0.0.1:1/v1",
        "--key-file", str(key_file), "--models", "x", user=member,
    )  # fmt: skip
    assert res.returncode != 0 and "admin" in res.stderr, res
    for method in ("llm.provider.ls", "llm.budget.set"):
        out = d.call_as(member, method, {"user": member} if "budget" in method else {})
        assert out["error"]["code"] == -32003, out

    err = d.error("llm.provider.add", name="bad", base_url="file:///etc/passwd",
                  secret="k", models=["m"])  # fmt: skip
    assert err.code == -32602 and "base_url" in str(err.data), err
    err = d.error("llm.provider.add", name="bad", base_url="https://u:p@x.example/v1",
                  secret="k", models=["m"])  # fmt: skip
    assert err.code == -32602 and "credentials" in str(err.data), err
    err = d.error("llm.provider.add", name="bad", base_url="https://x.example/v1",
                  secret="two words", models=["m"])  # fmt: skip
    assert err.code == -32602 and "two words" not in str(err.data), err
    err = d.error("llm.provider.add", name="dup", base_url="https://x.example/v1",
                  secret="k", models=[provider.models[0]])  # fmt: skip
    assert err.code == -32002 and provider.name in err.message, err

    # The audit log has the call, not the key.
    c = d.client()
    try:
        events = c.call("audit.list", {"method": "llm.provider.add", "limit": 50})
    finally:
        c.close()
    assert any(e["target"] == f"llm-provider:{provider.name}" for e in events), events
    assert provider.key not in json.dumps(events)
    assert provider.key not in d.log_text()
