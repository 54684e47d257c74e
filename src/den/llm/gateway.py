"""The gateway's HTTP side: OpenAI-compatible routes a workspace calls on the
metadata service, forwarded to the provider that serves the requested model.

Who is charged: the workspace's owner. Who may call: a request that reached
the metadata listener of that workspace (the listener names the workspace)
AND carries that workspace's own scoped token as its bearer, so that neither
a neighbour's packets nor a leaked token of another workspace spend the
owner's budget.

The provider's key is added here, on the host, and goes nowhere else: not to
the workspace (its token is never forwarded either), not to a log line, not
into an error text. Upstream bodies are passed on with the key masked (as
sent and as JSON escapes it), and an upstream's refusal of the key becomes
den's own message.

Streams (``"stream": true``) are relayed chunk by chunk as they arrive, with
``stream_options.include_usage`` asked of the upstream so that its last
chunk carries the token counts. A client that hangs up (or stops reading
for ``llm_timeout``) is let go, and the upstream read on for a little while
for those counts. An answer that ends without them is charged den's estimate
(about four bytes a token), shown as ``estimated`` by ``den llm usage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from sqlalchemy import select

from den import secretbox
from den.db.models import LlmProvider
from den.errors import Unauthenticated
from den.llm import budget
from den.meta import token
from den.meta.server import META_ROUTES, WsIdentity, den_app, identity

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)

# An answer that is not a stream is held whole to learn its usage: bounded, so
# that an upstream cannot fill the daemon's memory. 16 MB holds some 500
# embeddings of 1536 dimensions as JSON numbers, about 2000 as base64.
MAX_ANSWER_BYTES = 16 << 20
# A larger answer is parsed off the event loop (it takes milliseconds a MB).
PARSE_IN_THREAD = 1 << 20
# How long a stream whose client left is still read for its usage.
DRAIN_SECONDS = 10.0
# An SSE line longer than this is passed on but not searched for usage.
MAX_SSE_LINE = 1 << 20
TOKEN_URL = "http://169.254.169.254/v1/token"
ROUTES = {
    "/v1/chat/completions": "chat/completions",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


@dataclass(frozen=True)
class Charge:
    """The workspace a request came from and the owner it is charged to."""

    ws_id: str
    ws_ref: str  # OWNER/NAME
    user_id: int
    user: str


@dataclass(frozen=True)
class Upstream:
    name: str
    base_url: str
    key: str


def oai_error(
    status: int,
    message: str,
    type_: str,
    code: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    """An error as OpenAI's API words them, so that its clients show the message."""
    err = {"message": message, "type": type_, "param": param, "code": code, **extra}
    return web.Response(
        body=orjson.dumps({"error": err}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


async def check_bearer(app: App, request: web.Request, who: Charge) -> web.Response | None:
    """None when the bearer is ``who``'s workspace token; else the 401 to send."""
    header = request.headers.get("Authorization")
    hint = f"send 'Authorization: Bearer TOKEN' with this workspace's token from {TOKEN_URL}"
    if not header:
        return oai_error(401, f"no credentials: {hint}", "invalid_request_error", "missing_token")
    try:
        caller = await token.verify(app, header)
    except Unauthenticated as exc:
        return oai_error(401, f"{exc.message}; {hint}", "invalid_request_error", "invalid_token")
    # Only the token scoped to this very workspace: another workspace's would
    # let code that got hold of it spend from here (and be charged elsewhere).
    if caller.scope != who.ws_id:
        return oai_error(
            401,
            f"this is not this workspace's token; {hint}",
            "invalid_request_error",
            "invalid_token",
        )
    return None


async def _providers(app: App) -> list[LlmProvider]:
    async with app.sessions() as db:
        return list((await db.execute(select(LlmProvider).order_by(LlmProvider.name))).scalars())


async def _upstream_for(app: App, model: str) -> Upstream | None:
    from den.services.llm import key_purpose

    for p in await _providers(app):
        if model in (p.models or []):
            key = secretbox.unseal(app.settings.data_dir, p.key_sealed, key_purpose(p.name))
            return Upstream(p.name, p.base_url, key.decode())
    return None


async def models(app: App, request: web.Request, who: Charge) -> web.Response:
    """GET /v1/models: every provider's models, as one list."""
    refused = await check_bearer(app, request, who)
    if refused is not None:
        return refused
    data = [
        {
            "id": m,
            "object": "model",
            "created": int(p.created_at.timestamp()),
            "owned_by": p.name,
        }
        for p in await _providers(app)
        for m in p.models or []
    ]
    return web.json_response({"object": "list", "data": data}, dumps=_dumps)


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None when it is larger than ``limit``."""
    if request.content_length is not None and request.content_length > limit:
        return None
    buf = bytearray()
    async for chunk in request.content.iter_any():
        buf += chunk
        if len(buf) > limit:
            return None
    return bytes(buf)


class UsageScanner:
    """Finds the last ``usage`` object in an SSE stream fed in arbitrary chunks."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False  # inside a line too long to search
        self.counts: dict[str, int] | None = None

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        start = 0
        while (nl := self._buf.find(b"\n", start)) >= 0:
            if self._skipping:
                self._skipping = False
            else:
                self._line(bytes(self._buf[start:nl]))
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) > MAX_SSE_LINE:
            self._buf.clear()
            self._skipping = True

    def _line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return
        try:
            doc = orjson.loads(line[5:].strip())
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, dict):
            counts = budget.usage_counts(doc.get("usage"))
            if counts is not None:
                self.counts = counts


def key_forms(key: str) -> tuple[bytes, ...]:
    """The ways an upstream's text may quote the key: as sent, and inside a JSON
    string (a quote or backslash escaped; a slash too, as PHP's encoder does)."""
    escaped = orjson.dumps(key)[1:-1]
    forms = {key.encode(), escaped, escaped.replace(b"/", b"\\/")}
    return tuple(sorted(forms, key=len, reverse=True))


def mask(body: bytearray, forms: tuple[bytes, ...]) -> bytearray:
    """``body`` with the key masked; the same object (no copy) when it has none."""
    for form in forms:
        if form in body:
            body = body.replace(form, b"***")
    return body


class KeyMask:
    """Masks the provider key in a stream fed in arbitrary chunks (an upstream's
    error inside a stream may quote it, cut anywhere). Holds back only a tail
    that could begin the key, so that an SSE event still passes at once."""

    def __init__(self, forms: tuple[bytes, ...]) -> None:
        self._forms = forms
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._tail + chunk
        for form in self._forms:
            data = data.replace(form, b"***")
        cut = min(self._start_of(data, form) for form in self._forms)
        self._tail = data[cut:]
        return data[:cut]

    @staticmethod
    def _start_of(data: bytes, form: bytes) -> int:
        """Where a tail of ``data`` that could begin ``form`` starts (else its end)."""
        first = form[:1]
        i = data.find(first, max(0, len(data) - len(form) + 1))
        while i >= 0 and not form.startswith(data[i:]):
            i = data.find(first, i + 1)
        return len(data) if i < 0 else i

    def flush(self) -> bytes:
        out, self._tail = self._tail, b""
        return out


def _refuse(app: App, who: Charge, reason: str, resp: web.Response) -> web.Response:
    app.metrics.llm_refusals.labels(who.user, reason).inc()
    log.info(
        "llm request refused",
        extra={"ctx": {"user": who.user, "ws": who.ws_ref, "reason": reason}},
    )
    return resp


async def forward(app: App, request: web.Request, who: Charge, path: str) -> web.StreamResponse:
    """POST /v1/{path}: check, count and forward one request to its model's provider."""
    refused = await check_bearer(app, request, who)
    if refused is not None:
        return _refuse(app, who, "token", refused)
    limit = app.settings.llm_max_body_bytes
    body = await _read_body(request, limit)
    if body is None:
        return _refuse(
            app,
            who,
            "body_size",
            oai_error(
                413,
                f"the request body is larger than den's limit of {limit} bytes (llm_max_body_bytes)",
                "invalid_request_error",
                "request_too_large",
            ),
        )
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if not isinstance(doc, dict):
        return oai_error(
            400, "the body must be a JSON object", "invalid_request_error", "invalid_json"
        )
    model = doc.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 200:
        return oai_error(
            400,
            "'model' must name a model (GET /v1/models lists them)",
            "invalid_request_error",
            "invalid_model",
            param="model",
        )
    upstream = await _upstream_for(app, model)
    if upstream is None:
        return oai_error(
            404,
            f"no provider of den's serves the model {model!r}; GET /v1/models lists them",
            "invalid_request_error",
            "model_not_found",
            param="model",
        )
    if not isinstance(doc.get("stream"), bool | None):
        # An upstream that took "true" or 1 for true would stream without the
        # usage den asks of streams only: the request would go unmetered.
        return oai_error(
            400,
            "'stream' must be true or false",
            "invalid_request_error",
            "invalid_value",
            param="stream",
        )
    stream = path != "embeddings" and doc.get("stream") is True
    if stream:
        opts = doc.get("stream_options")
        doc["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    now = datetime.now(UTC)
    try:
        async with budget.slot(app, who.user_id):
            day = await budget.admit(app, who.user_id, upstream.name, model, now)
            return await _relay(app, request, who, upstream, path, doc, stream, day, model)
    except budget.TooMany as exc:
        return _refuse(
            app,
            who,
            "concurrency",
            oai_error(
                429,
                f"{who.user} has {exc.limit} LLM requests in flight, den's limit "
                "(llm_max_concurrent); retry when one ends",
                "rate_limit_exceeded",
                "concurrent_requests",
                headers={"Retry-After": "1"},
            ),
        )
    except budget.BudgetSpent as exc:
        unit = "tokens" if exc.which == "tokens" else "requests"
        resets = exc.resets.strftime("%Y-%m-%dT%H:%M:%SZ")
        wait = max(1, int((exc.resets - now).total_seconds()))
        return _refuse(
            app,
            who,
            exc.which,
            oai_error(
                429,
                f"the daily LLM budget of {who.user} for {unit} is spent "
                f"({exc.used} of {exc.limit} {unit} per day used); it resets at {resets} "
                "(midnight UTC)",
                "insufficient_quota",
                f"daily_{unit}_budget",
                headers={"Retry-After": str(wait)},
                budget=f"{unit}_per_day",
                limit=exc.limit,
                used=exc.used,
                resets_at=resets,
            ),
        )


async def _relay(
    app: App,
    request: web.Request,
    who: Charge,
    up: Upstream,
    path: str,
    doc: dict[str, Any],
    stream: bool,
    day: str,
    model: str,
) -> web.StreamResponse:
    t = app.settings.llm_timeout
    # No total: a long stream is fine as long as the upstream keeps sending.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
    headers = {
        "Authorization": f"Bearer {up.key}",
        "Content-Type": "application/json",
        "Accept": "text/event-stream" if stream else "application/json",
    }
    payload = orjson.dumps(doc)
    forms = key_forms(up.key)
    start = time.perf_counter()
    counts: dict[str, int] | None = None
    answered = False  # the upstream answered 200: it used tokens
    received = 0  # bytes of its answer
    outcome = "error"
    status = 0
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(
                f"{up.base_url}/{path}",
                data=payload,
                headers=headers,
                allow_redirects=False,  # the key goes to the base URL's host and nowhere else
            ) as resp,
        ):
            status = resp.status
            answered = status == 200
            if status in (401, 403):
                outcome = "provider_auth"
                return oai_error(
                    502,
                    f"provider {up.name!r} refused den's key for it (HTTP {status}); "
                    "an admin must replace it (den llm provider rm/add)",
                    "upstream_error",
                    "provider_auth",
                )
            ctype = resp.headers.get("Content-Type", "")
            if stream and status == 200 and ctype.startswith("text/event-stream"):
                relayed = await _pass_stream(request, resp, t, forms)
                counts, received, outcome = relayed.counts, relayed.received, relayed.outcome
                return relayed.out
            raw = bytearray()
            async for chunk in resp.content.iter_any():
                raw += chunk
                received = len(raw)
                if received > MAX_ANSWER_BYTES:
                    outcome = "too_large"
                    return oai_error(
                        502,
                        f"provider {up.name!r} answered with more than den's limit of "
                        f"{MAX_ANSWER_BYTES >> 20} MB for an answer that is not a stream; "
                        "ask for less at once (e.g. fewer inputs, or embeddings with "
                        '"encoding_format": "base64")',
                        "upstream_error",
                        "upstream_too_large",
                    )
            if status == 200:
                counts = await _usage_of(raw)
                outcome = "ok"
            else:
                outcome = f"upstream_{status}"
            # An upstream's error text may quote the key it was sent.
            return web.Response(
                body=mask(raw, forms),
                status=status,
                headers={"Content-Type": ctype or "application/json"},
            )
    except TimeoutError:
        outcome = "timeout"
        return oai_error(
            504,
            f"provider {up.name!r} did not answer within {t:g} s (llm_timeout)",
            "upstream_error",
            "upstream_timeout",
        )
    except aiohttp.ClientError as exc:
        # The exception's text names the URL at most (never the key), but say less.
        outcome = "unreachable"
        return oai_error(
            502,
            f"cannot reach provider {up.name!r} ({type(exc).__name__})",
            "upstream_error",
            "upstream_unreachable",
        )
    finally:
        seconds = time.perf_counter() - start
        estimated = counts is None and answered
        if counts is None and answered:
            # Without the upstream's figures a request must still cost tokens, or an
            # upstream that never reports them (or a client hanging up before the
            # last chunk) would make the tokens budget a dead letter. Embeddings
            # are charged for their input only: their answer is numbers, not text.
            counts = budget.estimate(len(payload), 0 if path == "embeddings" else received)
        if counts is not None:
            await asyncio.shield(
                budget.settle(app, who.user_id, day, up.name, model, counts, estimated=estimated)
            )
        m = app.metrics
        m.llm_requests.labels(who.user, up.name, model, outcome).inc()
        m.llm_latency.labels(up.name).observe(seconds)
        if counts is not None:
            m.llm_tokens.labels(who.user, up.name, model, "prompt").inc(counts["prompt_tokens"])
            m.llm_tokens.labels(who.user, up.name, model, "completion").inc(
                counts["completion_tokens"]
            )
        log.info(
            "llm request",
            extra={
                "ctx": {
                    "user": who.user,
                    "ws": who.ws_ref,
                    "provider": up.name,
                    "model": model,
                    "path": path,
                    "stream": stream,
                    "status": status,
                    "outcome": outcome,
                    "tokens": counts["total_tokens"] if counts else None,
                    "estimated": estimated,
                    "ms": round(seconds * 1e3, 1),
                }
            },
        )


async def _usage_of(raw: bytearray) -> dict[str, int] | None:
    """The usage figures of a whole answer, if it has them."""
    try:
        if len(raw) > PARSE_IN_THREAD:
            # Big answers (embeddings) would stall every other request meanwhile.
            answer = await asyncio.to_thread(orjson.loads, raw)
        else:
            answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return budget.usage_counts(answer.get("usage")) if isinstance(answer, dict) else None


class _ClientGone(Exception):
    """The workspace's client hung up, or stopped reading for llm_timeout."""


async def _to_client(request: web.Request, write: Awaitable[object], timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await write
    except TimeoutError:
        # A client that stops reading would hold its request (one of the owner's
        # llm_max_concurrent) and the upstream's stream forever: let it go.
        if request.transport is not None:
            request.transport.abort()
        raise _ClientGone("client_stalled") from None
    except ConnectionResetError:
        raise _ClientGone("client_gone") from None


@dataclass
class Relayed:
    out: web.StreamResponse
    counts: dict[str, int] | None
    received: int  # bytes the upstream sent
    outcome: str


async def _pass_stream(
    request: web.Request, resp: aiohttp.ClientResponse, timeout: float, forms: tuple[bytes, ...]
) -> Relayed:
    """Relay an SSE stream as it comes, the key masked; the usage of its last
    chunk that had one."""
    out = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache",
        },
    )
    scanner = UsageScanner()
    keys = KeyMask(forms)
    res = Relayed(out, None, 0, "ok")
    try:
        await _to_client(request, out.prepare(request), timeout)
        try:
            async for chunk in resp.content.iter_any():
                res.received += len(chunk)
                scanner.feed(chunk)
                # Waits while the client is slow (up to llm_timeout): never buffers the stream.
                await _to_client(request, out.write(keys.feed(chunk)), timeout)
        except TimeoutError:
            # Too late for a status: say it the way streams say errors.
            res.outcome = "timeout"
            err = {
                "error": {
                    "message": f"the provider sent nothing for {timeout:g} s (llm_timeout)",
                    "type": "upstream_error",
                    "code": "upstream_timeout",
                }
            }
            tail = keys.flush() + b"\n\ndata: " + orjson.dumps(err) + b"\n\n"
            await _to_client(request, out.write(tail), timeout)
        except aiohttp.ClientError:
            res.outcome = "upstream_broken"  # what was used so far still counts
        await _to_client(request, out.write(keys.flush()), timeout)
        await _to_client(request, out.write_eof(), timeout)
    except _ClientGone as exc:
        res.outcome = str(exc)
        # The upstream goes on generating (and billing) anyway: its last chunk,
        # if it comes soon, has the real usage.
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with asyncio.timeout(DRAIN_SECONDS):
                async for chunk in resp.content.iter_any():
                    res.received += len(chunk)
                    scanner.feed(chunk)
    res.counts = scanner.counts
    return res


# -- routes on the metadata app ------------------------------------------------------


def _charge(request: web.Request) -> tuple[App, Charge]:
    ident: WsIdentity = identity(request)
    return den_app(request), Charge(ident.ws_id, ident.ref, ident.owner_id, ident.owner)


async def _models(request: web.Request) -> web.StreamResponse:
    app, who = _charge(request)
    return await models(app, request, who)


def _forwarder(path: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        app, who = _charge(request)
        return await forward(app, request, who, path)

    return handler


def _add(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/models", _models)
    for route, path in ROUTES.items():
        router.add_post(route, _forwarder(path))


META_ROUTES.append(_add)
