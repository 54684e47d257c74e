"""The listener Caddy alone reaches (a unix socket): the gate, error pages, and
den's own pages at the domain itself (signing a browser in and out)."""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from den.errors import DenError, Unauthenticated
from den.rpc.registry import REGISTRY, Caller, Right
from den.services import weblogin
from den.web import pages
from den.web.caddy_config import ERROR, GATE, PAGES
from den.web.gate import Gate, _cookies
from den.web.urls import base, home_url

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
GATE_KEY = web.AppKey("den_gate", Gate)
# den's own host alone: no workspace host can plant a __Host- cookie for it.
NEXT_COOKIE = "__Host-den_next"


def _gate(request: web.Request) -> Gate:
    return request.app[GATE_KEY]


def _safe_next(app: App, url: str) -> str:
    """Where to go after signing in: only an https URL of den's domain and port, rebuilt
    from its parts (a browser reads ``\\``, user info or control bytes otherwise)."""
    home = home_url(app.settings)
    if len(url) > 4000 or any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        return home
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:
        return home
    host = (parts.hostname or "").lower()
    domain = app.settings.domain
    if (
        parts.scheme != "https"
        or parts.username is not None
        or parts.password is not None
        or port != app.settings.web_port
        or not (host == domain or host.endswith("." + domain))
    ):
        return home
    path = parts.path if parts.path.startswith("/") else "/" + parts.path
    return base(app.settings, host) + path + ("?" + parts.query if parts.query else "")


def _session_cookie(app: App, value: str, max_age: int) -> str:
    return (
        f"{weblogin.COOKIE}={value}; Domain={app.settings.domain}; Path=/; Max-Age={max_age}; "
        "Secure; HttpOnly; SameSite=Lax"
    )


def _same_origin(request: web.Request, app: App) -> bool:
    """A form post from den's own page (login CSRF: nobody else may sign you in)."""
    origin = request.headers.get("Origin", "")
    if origin.rstrip("/") == home_url(app.settings).rstrip("/"):
        return True
    # Browsers send "Origin: null" for a form on a page with "Referrer-Policy: no-referrer"
    # (den's pages); their Sec-Fetch-Site, which no page can set, says where it came from.
    return origin == "null" and request.headers.get("Sec-Fetch-Site") == "same-origin"


async def gate_handler(request: web.Request) -> web.StreamResponse:
    return await _gate(request).check(request)


async def error_handler(request: web.Request) -> web.StreamResponse:
    return await _gate(request).error(request)


async def pages_handler(request: web.Request) -> web.StreamResponse:
    gate = _gate(request)
    app = gate.app
    path = request.path.removeprefix(PAGES) or "/"
    if path == "/_den/login":
        if request.method == "POST":
            return await _login_post(request, app)
        return await _login_get(request, app)
    if path == "/_den/logout" and request.method == "POST":
        return await _logout(request, app, gate)
    if path == "/" and request.method in ("GET", "HEAD"):
        return await _home(request, app, gate)
    return pages.not_found()


async def _login_get(request: web.Request, app: App) -> web.Response:
    link = request.query.get("t", "")
    nxt = _safe_next(app, request.query.get("next", ""))
    if not link:
        host = urlsplit(home_url(app.settings)).hostname or "HOST"
        port = app.ssh_port or app.settings.ssh_port
        body = (
            pages.para("den signs browsers in with your SSH key. In a terminal, run")
            + pages.para(f"ssh -p {port} {host} login")
            + pages.para("and open the link it prints (it works once, for a few minutes).")
        )
        resp = pages.page("Sign in to den", body, 401)
        if nxt != home_url(app.settings):
            # Where to go once signed in, for the link opened next in this browser.
            resp.set_cookie(
                NEXT_COOKIE, nxt, max_age=900, secure=True, httponly=True, samesite="Lax"
            )
        return resp
    name = await weblogin.link_user(app, link)
    if name is None:
        body = pages.para("This sign-in link is not valid (used, expired or mistyped); run ")
        return pages.page("Link not valid", body + pages.para("ssh HOST login"), 401)
    # A button, not a GET that signs in: link previews must not use the link up.
    form = (
        f'<form method=post action="/_den/login"><input type=hidden name=t value="{_attr(link)}">'
        f'<input type=hidden name=next value="{_attr(nxt)}">'
        "<button type=submit>Sign in</button></form>"
    )
    # CSP's form-action covers the redirect that answers the form: to a workspace URL.
    csp = pages.SECURITY_HEADERS["Content-Security-Policy"].replace(
        "form-action 'self'",
        f"form-action 'self' {base(app.settings, '*.' + app.settings.domain)}",
    )
    return pages.page(
        "Sign in to den",
        pages.para(f"Sign this browser in to den as {name}?") + form,
        headers={"Content-Security-Policy": csp},
    )


def _attr(value: str) -> str:
    from html import escape

    return escape(value, quote=True)


async def _login_post(request: web.Request, app: App) -> web.Response:
    if not _same_origin(request, app):
        return pages.page("Refused", pages.para("This form must be sent from den's own page."), 403)
    form = await request.post()
    link = str(form.get("t", ""))
    nxt = _safe_next(app, str(form.get("next", "")))
    if nxt == home_url(app.settings):
        nxt = _safe_next(app, request.cookies.get(NEXT_COOKIE, ""))
    client = request.headers.get("X-Den-Remote", "")
    agent = request.headers.get("User-Agent", "")[:200]
    try:
        value, _expires, name = await weblogin.consume_link(app, link, client, agent)
    except Unauthenticated as err:
        return pages.page("Link not valid", pages.para(err.message), 401)
    max_age = max(1, int(app.settings.web_session_days * 86400))
    resp = web.Response(status=303, headers={"Location": nxt, "Cache-Control": "no-store"})
    resp.headers.add("Set-Cookie", _session_cookie(app, value, max_age))
    resp.del_cookie(NEXT_COOKIE, secure=True, httponly=True, samesite="Lax")
    log.info("browser signed in", extra={"ctx": {"user": name}})
    return resp


async def _logout(request: web.Request, app: App, gate: Gate) -> web.Response:
    if not _same_origin(request, app):
        return pages.page("Refused", pages.para("This form must be sent from den's own page."), 403)
    values = _cookies(request.headers.getall("Cookie", [])).get(weblogin.COOKIE, [])
    for value in values:
        who = await weblogin.session_user(app, value)
        if who is None:
            continue
        caller = Caller(who.name, who.role, Right.write, "web", user_id=who.user_id)
        try:
            await REGISTRY.call(app, caller, "login.revoke", {"id": who.session_id})
        except DenError as err:
            log.warning("sign-out failed: %s", err.message)
    resp = web.Response(status=303, headers={"Location": home_url(app.settings)})
    resp.headers.add("Set-Cookie", _session_cookie(app, "", 0))
    return resp


async def _home(request: web.Request, app: App, gate: Gate) -> web.Response:
    values = _cookies(request.headers.getall("Cookie", [])).get(weblogin.COOKIE, [])
    who = await gate._signed_in(values, request.headers.get("X-Den-Remote", ""))
    if who is None:
        return await _login_get(request, app)
    form = '<form method=post action="/_den/logout"><button type=submit>Sign out</button></form>'
    return pages.page("den", pages.para(f"Signed in as {who.name}.") + form)


async def ask_handler(request: web.Request) -> web.Response:
    """Caddy's on-demand TLS question: may it get a certificate for ``domain``?"""
    from den.rpc.server import APP_KEY

    app: App = request.app[APP_KEY]  # type: ignore[assignment]
    caddy = getattr(app, "caddy", None)
    given = request.match_info.get("secret", "").encode()
    if caddy is None or not hmac.compare_digest(given, caddy.ask_secret.encode()):
        return web.Response(status=404)
    name = request.query.get("domain", "").lower().rstrip(".")
    gate: Gate | None = getattr(app, "gate", None)
    if gate is None:
        return web.Response(status=404)
    if name == app.settings.domain or await gate.dir.site(name) is not None:
        return web.Response(status=200)
    return web.Response(status=404)


def make_gate_app(app: App, gate: Gate) -> web.Application:
    web_app = web.Application(client_max_size=64 * 1024)
    web_app[GATE_KEY] = gate
    web_app.router.add_get(GATE, gate_handler)
    web_app.router.add_get(ERROR, error_handler)
    web_app.router.add_route("*", PAGES + "{tail:.*}", pages_handler)
    return web_app
