"""A member's pages: their workspaces, one workspace, SSH keys, API tokens, audit trail.
Every fact comes from a registered method, called as the signed-in user."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from den.errors import DenError
from den.web.dash.base import Browser, _not_found, call, render, signed_in


async def _images(b: Browser) -> list[dict[str, Any]]:
    try:
        images: list[dict[str, Any]] = await call(b, "image.list", {})
    except DenError:
        return []
    return [i for i in images if i.get("state") in ("ready", "")]


async def home(request: web.Request) -> web.Response:
    b = await signed_in(request)
    assert b.caller is not None
    workspaces = await call(b, "workspace.list", {})
    # An admin's session.list and job.list are everyone's: the home page is one's own.
    sessions = [s for s in await call(b, "session.list", {}) if s["user"] == b.caller.name]
    jobs = [j for j in await call(b, "job.list", {}) if j["owner"] == b.caller.name]
    return render(
        request, "home.html", b=b, title="Workspaces", workspaces=workspaces,
        sessions=sessions, jobs=jobs, images=await _images(b), live="workspace,session,job",
    )  # fmt: skip


async def workspace(request: web.Request) -> web.Response:
    b = await signed_in(request)
    ref = f"{request.match_info['owner']}/{request.match_info['name']}"
    try:
        ws = await call(b, "workspace.get", {"ref": ref})
    except DenError:
        # Not yours, or not there: the same page as an unknown address.
        raise _not_found() from None
    try:
        share = await call(b, "share.show", {"ref": ref})
    except DenError:
        share = None
    try:
        sessions = [s for s in await call(b, "session.list", {}) if s["workspace"] == ref]
    except DenError:
        sessions = []
    return render(
        request, "workspace.html", b=b, title=ref, ws=ws, share=share, sessions=sessions,
        next=f"/w/{ref}", live="workspace,session",
    )  # fmt: skip


async def keys(request: web.Request) -> web.Response:
    b = await signed_in(request)
    assert b.caller is not None
    rows = await call(b, "key.list", {"user": b.caller.name})
    return render(request, "keys.html", b=b, title="SSH keys", keys=rows)


async def tokens(request: web.Request) -> web.Response:
    b = await signed_in(request)
    rows = await call(b, "token.list", {})
    return render(request, "tokens.html", b=b, title="API tokens", tokens=rows)


async def audit(request: web.Request) -> web.Response:
    b = await signed_in(request)
    assert b.caller is not None
    rows = await call(b, "audit.list", {"actor": b.caller.name, "limit": 200})
    return render(request, "audit.html", b=b, title="Audit trail", events=rows)


def add_routes(router: web.UrlDispatcher, prefix: str) -> None:
    router.add_get(prefix + "/", home)
    router.add_get(prefix + "/w/{owner}/{name}", workspace)
    router.add_get(prefix + "/keys", keys)
    router.add_get(prefix + "/tokens", tokens)
    router.add_get(prefix + "/audit", audit)
