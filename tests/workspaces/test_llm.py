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
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from den.cli.client import RpcError
from tests.conftest import Daemon
from tests.workspaces.conftest import Users, create, detach, make_users, ok, sh

USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
META = "http://169.254.169.254"
SLOW = 2.0  # seconds between the chunks of the "-slow" model's streams
FLOOD = 48 << 20  # bytes of a "-flood" stream: more than the sockets on its way hold


def leaks(key: str, text: str) -> bool:
    """Whether ``text`` quotes the key, as is or escaped in a JSON string."""
    return key in text or json.dumps(key)[1:-1] in text


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
        if body["model"].endswith("-leaky") and not body.get("stream"):
            # Some providers quote the key they were sent in their errors.
            msg = f"model overloaded for key {self.key}"
            return web.json_response({"error": {"message": msg}}, status=400)
        mute = body["model"].endswith("-mute")  # a provider that never reports usage
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "pong"}}],
                    **({} if mute else {"usage": USAGE}),
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if body["model"].endswith("-leaky"):
            # An error in the stream quoting the key, cut in two inside it.
            err = b'data: {"error": {"message": "quota of ' + self.key.encode() + b'"}}\n\n'
            cut = err.index(self.key.encode()) + len(self.key) // 2
            for part in (err[:cut], err[cut:]):
                await resp.write(part)
                await asyncio.sleep(0.2)
            await resp.write_eof()
            return resp
        if body["model"].endswith("-flood"):
            event = b"data: " + json.dumps({"pad": "x" * 65000}).encode() + b"\n\n"
            for _ in range(FLOOD // len(event)):
                await resp.write(event)
        for word in ("str", "eam", "ed"):
            chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": word}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(SLOW if body["model"].endswith("-slow") else 0.05)
        if (body.get("stream_options") or {}).get("include_usage") and not mute:
            last = {"object": "chat.completion.chunk", "choices": [], "usage": USAGE}
            await resp.write(b"data: " + json.dumps(last).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            self.bad_auth += 1
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.json()
        self.seen.append(body)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
                # As large an answer as the test asks for.
                "pad": "x" * body.get("dimensions", 0),
            }
        )


@pytest.fixture(scope="module")
def provider(pool_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The fake upstream, added to den as a provider (by the CLI, key from a file)."""
    d = pool_daemon
    # A quote and a slash: JSON escapes them, and den must mask that form too.
    key = f'sk-test/{secrets.token_hex(8)}"{secrets.token_hex(8)}'
    up = FakeProvider(key)
    up.start()
    name = f"p{secrets.token_hex(3)}"
    models = [f"{name}-{m}" for m in ("chat", "leaky", "embed", "slow", "mute", "flood")]
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
    assert not leaks(provider.key, json.dumps(listed))
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
    assert not leaks(provider.key, json.dumps(events))
    assert not leaks(provider.key, d.log_text())


# -- from inside a workspace --------------------------------------------------------

TOKEN = f'wget -qO- --header "Den-Metadata: true" {META}/v1/token | sed \'s/.*"token": *"\\([^"]*\\)".*/\\1/\''


@pytest.fixture(scope="module")
def ws(pool_daemon: Daemon, bb_image: str) -> Iterator[tuple[str, str]]:
    """A member and a busybox workspace of theirs: (user, ref)."""
    with make_users(pool_daemon) as us:
        owner = us.make()
        create(pool_daemon, owner, "llm", image=bb_image)
        yield owner, f"{owner}/llm"


def post(d: Daemon, ref: str, path: str, body: dict[str, Any], token: str = "") -> str:
    """POST from inside with busybox wget and the workspace's token; its stdout."""
    auth = (
        f'"Authorization: Bearer {token}"' if token else '"Authorization: Bearer $(' + TOKEN + ')"'
    )
    script = (
        f"wget -qO- --header {auth} --header 'Content-Type: application/json' "
        f'--post-data "$BODY" {META}{path}'
    )
    return ok(d, ref, script, env={"BODY": json.dumps(body)})


def raw_post(
    d: Daemon, ref: str, path: str, body: dict[str, Any], auth: str = ""
) -> tuple[int, str]:
    """POST over a raw HTTP/1.0 connection (busybox nc): the status and body even of an
    error, which busybox wget does not show. nc's input stays open (a fifo held by fd 3)
    until the server has answered and closed: at its end of input nc half-closes, and
    the server would hang up before answering."""
    script = (
        f'T="{auth}"; [ -n "$T" ] || T="Bearer $({TOKEN})"; F=/tmp/llm.$$; mkfifo $F; '
        f"nc 169.254.169.254 80 <$F >$F.out & P=$!; exec 3>$F; "
        f"printf 'POST {path} HTTP/1.0\\r\\nHost: m\\r\\nAuthorization: %s\\r\\n"
        "Content-Type: application/json\\r\\nContent-Length: %s\\r\\n\\r\\n%s' "
        '"$T" "${#BODY}" "$BODY" >&3; wait $P; exec 3>&-; cat $F.out; rm -f $F $F.out'
    )
    out = ok(d, ref, script, env={"BODY": json.dumps(body)})
    head, _, payload = out.partition("\r\n\r\n")
    return int(head.split()[1]), payload


def prometheus(d: Daemon) -> str:
    """GET /metrics as root over the daemon's unix socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(d.socket))
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: den\r\n\r\n")
        data = b"".join(iter(lambda: s.recv(65536), b""))
    head, _, body = data.decode().partition("\r\n\r\n")
    assert " 200 " in head.splitlines()[0], head
    return body


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "ping"}], "stream": stream}


def usage_of(d: Daemon, user: str) -> dict[str, Any]:
    res = d.cli("llm", "usage", user, "--json", check=True)
    rows = json.loads(res.stdout)
    assert len(rows) == 1 and rows[0]["user"] == user, rows
    return dict(rows[0])


def test_chat_and_stream_pass_through(pool_daemon: Daemon, provider: Any, ws: Any) -> None:
    d, (owner, ref) = pool_daemon, ws
    model = provider.models[0]
    listed = json.loads(
        ok(d, ref, f'wget -qO- --header "Authorization: Bearer $({TOKEN})" {META}/v1/models')
    )
    assert {m["id"] for m in listed["data"]} >= set(provider.models), listed

    answer = json.loads(post(d, ref, "/v1/chat/completions", chat(model)))
    assert answer["choices"][0]["message"]["content"] == "pong"
    assert answer["usage"] == USAGE
    assert provider.up.seen[-1]["messages"] == [{"role": "user", "content": "ping"}]

    streamed = post(d, ref, "/v1/chat/completions", chat(model, stream=True))
    events = [line[6:] for line in streamed.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", streamed
    words = [c["delta"]["content"] for e in events[:-1] for c in json.loads(e)["choices"]]
    assert "".join(words) == "streamed"
    # den asked the upstream for the stream's usage, and passed its chunk on.
    assert provider.up.seen[-1]["stream_options"] == {"include_usage": True}
    assert json.loads(events[-2])["usage"] == USAGE

    emb = json.loads(post(d, ref, "/v1/embeddings", {"model": provider.models[2], "input": "x"}))
    assert emb["data"][0]["embedding"] == [0.1, 0.2]

    # An upstream error quoting the key (JSON-escaped) reaches the workspace masked.
    status, body = raw_post(d, ref, "/v1/chat/completions", chat(provider.models[1]))
    assert status == 400 and "overloaded" in body and not leaks(provider.key, body), body
    assert "key ***" in body, body

    status, body = raw_post(d, ref, "/v1/chat/completions", chat("no-such-model"))
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found", body

    u = usage_of(d, owner)
    assert u["requests"] == 4, u
    assert u["tokens"] == 2 * USAGE["total_tokens"] + 3, u
    by_model = {m["model"]: m for m in u["models"]}
    assert by_model[model]["requests"] == 2 and by_model[model]["prompt_tokens"] == 14
    # The member sees their own use with `den llm usage`, not anyone else's.
    res = d.cli("llm", "usage", user=owner, check=True)
    assert owner in res.stdout and "27" in res.stdout, res.stdout
    assert d.cli("llm", "usage", "root", user=owner).returncode != 0

    assert provider.up.bad_auth == 0
    prom = prometheus(d)
    assert (
        f'den_llm_tokens_total{{kind="completion",model="{model}",provider="{provider.name}",user="{owner}"}} 10.0'
        in prom
    )


def test_only_the_workspace_token(pool_daemon: Daemon, provider: Any, ws: Any) -> None:
    d, (owner, ref) = pool_daemon, ws
    status, body = raw_post(d, ref, "/v1/chat/completions", chat(provider.models[0]), auth="x")
    assert status == 401, body
    user_token = d.call("token.create", user=owner, right="write")["token"]
    status, body = raw_post(
        d, ref, "/v1/chat/completions", chat(provider.models[0]), auth=f"Bearer {user_token}"
    )
    assert status == 401 and "token" in json.loads(body)["error"]["message"], body


def test_budgets_refuse_at_the_limit(pool_daemon: Daemon, provider: Any, ws: Any) -> None:
    d, (owner, ref) = pool_daemon, ws
    model = provider.models[0]
    before = usage_of(d, owner)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
    try:
        d.call("llm.budget.set", user=owner, requests_per_day=before["requests"] + 1)
        post(d, ref, "/v1/chat/completions", chat(model))  # the last one allowed
        status, body = raw_post(d, ref, "/v1/chat/completions", chat(model, stream=True))
        assert status == 429, body
        err = json.loads(body)["error"]
        assert err["code"] == "daily_requests_budget" and err["budget"] == "requests_per_day"
        assert err["resets_at"] == tomorrow and tomorrow in err["message"], err
        assert usage_of(d, owner)["requests"] == before["requests"] + 1

        d.call("llm.budget.set", user=owner, requests_per_day=0, tokens_per_day=1)
        status, body = raw_post(
            d, ref, "/v1/embeddings", {"model": provider.models[2], "input": "x"}
        )
        assert status == 429, body
        err = json.loads(body)["error"]
        assert err["code"] == "daily_tokens_budget" and "tokens" in err["message"], err
        assert err["resets_at"] == tomorrow
    finally:
        d.call("llm.budget.set", user=owner, requests_per_day=-1, tokens_per_day=-1)
    post(d, ref, "/v1/chat/completions", chat(model))  # the default: no limit
    prom = prometheus(d)
    assert f'den_llm_refusals_total{{reason="requests",user="{owner}"}} 1.0' in prom
    assert f'den_llm_refusals_total{{reason="tokens",user="{owner}"}} 1.0' in prom


def test_the_key_never_reaches_the_workspace(pool_daemon: Daemon, provider: Any, ws: Any) -> None:
    d, (_owner, ref) = pool_daemon, ws
    post(d, ref, "/v1/chat/completions", chat(provider.models[0], stream=True))
    # The needle in two halves: the search's own environment must not match.
    half = len(provider.key) // 2
    found = sh(
        d,
        ref,
        'K="$A$B"; grep -rl "$K" /etc /home /root /tmp /var /run 2>/dev/null; '
        # Matched by the shell itself: a grep's own command line would hold the needle.
        "n=0; for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do "
        "tr '\\0' '\\n' <$f 2>/dev/null >/tmp/.p; "
        'while read -r l; do case "$l" in *"$K"*) n=$((n+1));; esac; done </tmp/.p; done; '
        "rm -f /tmp/.p; echo $n",
        env={"A": provider.key[:half], "B": provider.key[half:]},
    )
    assert found["stdout"].split() == ["0"], found
    assert not leaks(provider.key, d.log_text())
    c = d.client()
    try:
        events = c.call("audit.list", {"limit": 1000})
    finally:
        c.close()
    assert not leaks(provider.key, json.dumps(events))


def test_streams_arrive_as_sent_and_in_flight_is_capped(
    pool_daemon: Daemon, provider: Any, ws: Any
) -> None:
    d, (_owner, ref) = pool_daemon, ws
    slow = json.dumps(chat(provider.models[3], stream=True))
    req = (
        f'wget -qO- --header "Authorization: Bearer $T" --header "Content-Type: application/json" '
        f'--post-data "$BODY" {META}/v1/chat/completions'
    )
    # The first chunk is read a whole pause before the stream ends: den did not hold it.
    # Meanwhile the owner's cap of requests in flight (llm_max_concurrent, 4) holds.
    script = (
        f"T=$({TOKEN}); for i in 1 2 3; do {req} >/dev/null & done; "
        f"{req} | {{ read -r first; A=$(date +%s); cat >/dev/null; B=$(date +%s); "
        'echo "$first" | grep -q "data: " && echo "gap $((B - A))"; } & sleep 0.5; '
        f"{req} 2>&1; wait"
    )
    out = ok(d, ref, script, env={"BODY": slow})
    gap = int(out.split("gap ")[1].split()[0])
    assert gap >= SLOW * 2 - 1, out
    assert "429" in out, out


def test_stream_errors_masked_and_stream_a_boolean(
    pool_daemon: Daemon, provider: Any, ws: Any
) -> None:
    d, (_owner, ref) = pool_daemon, ws
    # The key quoted in an error inside a 200 stream, arriving in two pieces.
    out = post(d, ref, "/v1/chat/completions", chat(provider.models[1], stream=True))
    assert "quota of ***" in out and provider.key not in out, out
    half = len(provider.key) // 2
    assert provider.key[:half] not in out and provider.key[half:] not in out, out
    # A "stream" that is not a boolean is refused: an upstream taking "true" or 1 for
    # true would stream without the usage den asks of streams, and go unmetered.
    for value in ("true", 1):
        status, body = raw_post(
            d, ref, "/v1/chat/completions", {**chat(provider.models[0]), "stream": value}
        )
        assert status == 400, body
        assert json.loads(body)["error"]["param"] == "stream", body


def test_answers_without_usage_are_charged_an_estimate(
    pool_daemon: Daemon, provider: Any, ws: Any
) -> None:
    d, (owner, ref) = pool_daemon, ws
    mute = provider.models[4]
    before = usage_of(d, owner)
    assert post(d, ref, "/v1/chat/completions", chat(mute, stream=True)).endswith("[DONE]\n\n")
    assert "pong" in post(d, ref, "/v1/chat/completions", chat(mute))
    u = usage_of(d, owner)
    # About four bytes a token of the request and the answer: never nothing.
    assert u["tokens"] - before["tokens"] >= 2 * len(json.dumps(chat(mute))) // 4, (before, u)
    assert u["estimated"] == before["estimated"] + 2, u
    m = {m["model"]: m for m in u["models"]}[mute]
    assert m["estimated"] == 2 and m["completion_tokens"] > 0, m


def test_big_answers(pool_daemon: Daemon, provider: Any, ws: Any) -> None:
    d, (owner, ref) = pool_daemon, ws
    embed = {"model": provider.models[2], "input": "x"}
    before = usage_of(d, owner)
    # Past 1 MB the answer is parsed in a thread: it passes whole, its usage counted.
    out = ok(
        d,
        ref,
        f'wget -qO- --header "Authorization: Bearer $({TOKEN})" '
        f"--header 'Content-Type: application/json' --post-data \"$BODY\" "
        f"{META}/v1/embeddings | wc -c",
        env={"BODY": json.dumps({**embed, "dimensions": 3 << 20})},
    )
    assert int(out) > 3 << 20, out
    assert usage_of(d, owner)["tokens"] == before["tokens"] + 3
    # Past 16 MB den refuses to hold it, and says so.
    status, body = raw_post(d, ref, "/v1/embeddings", {**embed, "dimensions": 17 << 20})
    err = json.loads(body)["error"]
    assert status == 502 and err["code"] == "upstream_too_large", body
    assert "16 MB" in err["message"] and "base64" in err["message"], err


def test_clients_that_leave_or_stop_reading(pool_daemon: Daemon, provider: Any, ws: Any) -> None:
    """A client hanging up before the usage chunk, and one that stops reading (let go after
    llm_timeout, 5 s in tests): den reads on and charges the upstream's real usage."""
    d, (owner, ref) = pool_daemon, ws
    before = usage_of(d, owner)
    req = (
        f'wget -qO- --header "Authorization: Bearer $({TOKEN})" '
        f"--header 'Content-Type: application/json' --post-data \"$BODY\" "
        f"{META}/v1/chat/completions"
    )
    flood = json.dumps(chat(provider.models[5], stream=True))
    detach(d, ref, f"BODY='{flood}'; {req} | sleep 20")
    first = ok(
        d, ref, f"{req} | head -n1", env={"BODY": json.dumps(chat(provider.models[3], True))}
    )
    assert first.startswith("data: "), first
    deadline = time.monotonic() + 30
    want = before["tokens"] + 2 * USAGE["total_tokens"]
    while (u := usage_of(d, owner))["tokens"] < want and time.monotonic() < deadline:
        time.sleep(0.5)
    assert u["tokens"] == want and u["estimated"] == before["estimated"], (before, u)
    prom = prometheus(d)
    for outcome, model in (("client_gone", 3), ("client_stalled", 5)):
        assert f'model="{provider.models[model]}",outcome="{outcome}"' in prom, prom
