"""``GET /_den/events``: live updates as server-sent events.

Every second the stream asks the registry (as the signed-in user) for workspaces,
sessions and jobs, and sends only what changed, one event per thing:
``{"kind": "workspace", "id": "alice/app", "fields": {...}}`` or, when it is gone,
``{"kind": ..., "id": ..., "gone": true}``. ``?all=1`` asks for every user's (admins;
for anyone else the registry refuses and that part is left out).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from typing import Any

from aiohttp import web

from den.errors import DenError
from den.services.revocation import Revoked
from den.web.dash.base import Browser, call, signed_in, user_of

EVERY = 1.0  # seconds between looks
RECHECK = 5.0  # seconds between checks that the browser session still stands
KEEPALIVE = 15.0  # seconds of silence before a comment line (finds clients gone)
STREAMS_PER_USER = 8
ID_FIELD = {"workspace": "ref", "session": "id", "job": "id"}
OWNER_FIELD = {"workspace": "owner", "session": "user", "job": "owner"}
# What a page shows of each: the rest (logs, results) is not streamed.
FIELDS = {
    "workspace": ("state", "state_reason", "last_activity_at", "last_activity_kind", "cpu",
                  "memory_mb", "disk_mb", "address", "owner", "name", "url"),
    "session": ("user", "workspace", "kind", "client", "started_at", "bytes_in", "bytes_out",
                "channels", "requests"),
    "job": ("kind", "target", "owner", "state", "now", "end", "step", "error", "finished_at"),
}  # fmt: skip
Key = tuple[str, str]

_open: Counter[tuple[int, int]] = Counter()  # streams per (app, user)


def _sources(everyone: bool) -> list[tuple[str, str, dict[str, Any]]]:
    ws: dict[str, Any] = {"all": True} if everyone else {}
    return [("workspace", "workspace.list", ws), ("session", "session.list", {}),
            ("job", "job.list", {})]  # fmt: skip


async def snapshot(b: Browser, everyone: bool, kinds: set[str]) -> dict[Key, dict[str, Any]]:
    """What the page shows, as the registry tells this user now."""
    assert b.caller is not None
    name = b.caller.name
    out: dict[Key, dict[str, Any]] = {}
    for kind, method, params in _sources(everyone):
        if kind not in kinds:
            continue
        try:
            rows = await call(b, method, params)
        except DenError:
            continue  # not theirs to see: left out
        for row in rows:
            # An admin's session.list and job.list are everyone's: without ?all=1 only
            # their own, as for anyone.
            if not everyone and row.get(OWNER_FIELD[kind], name) != name:
                continue
            out[(kind, str(row[ID_FIELD[kind]]))] = {f: row.get(f) for f in FIELDS[kind]}
    return out


def changes(before: dict[Key, dict[str, Any]], now: dict[Key, dict[str, Any]]) -> list[str]:
    """One SSE event per thing that changed, appeared or went."""
    out: list[dict[str, Any]] = []
    for (kind, id_), fields in now.items():
        if before.get((kind, id_)) != fields:
            out.append({"kind": kind, "id": id_, "fields": fields})
    out += [{"kind": k, "id": i, "gone": True} for (k, i) in before if (k, i) not in now]
    return [f"data: {json.dumps(e, default=str)}\n\n" for e in out]


async def events_handler(request: web.Request) -> web.StreamResponse:
    b = await signed_in(request)
    assert b.caller is not None and b.caller.user_id is not None
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        # Another page (a workspace's is same-site: the cookie goes along) could hold
        # this user's streams open, each a registry poll a second, until the cap
        # refuses den's own pages. Only the browser sets this header.
        raise web.HTTPForbidden(text="den: live updates are for den's own pages\n")
    uid = b.caller.user_id
    key = (id(b.app), uid)
    if _open[key] >= STREAMS_PER_USER:
        raise web.HTTPTooManyRequests(text=f"at most {STREAMS_PER_USER} live streams a user")
    everyone = request.query.get("all") == "1"
    kinds = set(request.query.get("kinds", "workspace,session,job").split(",")) & set(FIELDS)
    ended = asyncio.Event()

    def revoked(ev: Revoked) -> None:
        if ev.user_id == uid:
            ended.set()

    _open[key] += 1
    unsubscribe = b.app.revocations.subscribe(revoked)
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        }
    )
    try:
        await resp.prepare(request)
        await resp.write(b"retry: 3000\n\n")
        state: dict[Key, dict[str, Any]] = {}
        checked = spoke = time.monotonic()
        while not ended.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the client left
            now = await snapshot(b, everyone, kinds)
            out = changes(state, now)
            state = now
            if not out and time.monotonic() - spoke > KEEPALIVE:
                out = [": still here\n\n"]
            if out:
                await resp.write("".join(out).encode())
                spoke = time.monotonic()
            if time.monotonic() - checked >= RECHECK:
                # The session itself, from the database (not the gate's memo): signed
                # out, expired, or the user demoted or gone ends the stream.
                who = await user_of(b.app, b.cookies, b.remote)
                if who is None or who.user_id != uid or who.role != b.caller.role:
                    break
                checked = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), EVERY)
    except (ConnectionResetError, ConnectionError):
        pass  # the client left mid-write
    finally:
        unsubscribe()
        _open[key] -= 1
        if _open[key] <= 0:
            del _open[key]
    return resp
