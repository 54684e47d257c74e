"""The listener Caddy alone reaches (a unix socket): the gate, error pages, and
den's own pages at the domain itself (signing a browser in and out)."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from den.errors import DenError, Unauthenticated
from den.rpc.registry import REGISTRY, Caller, Right
from den.services import weblogin
from den.web import dash, pages
from den.web.caddy_config import ERROR, GATE, PAGES
from den.web.dash.base import HOST_COOKIE, SURFACE, Surface, session_values
from den.web.gate import Gate
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


@dataclass(frozen=True)
class Door:
    """Where a browser signs in: den's domain through Caddy (a cookie for the domain,
    which its workspace URLs see too), or den's own TCP listener (a host-only cookie,
    which every port of that host gets: the session is bound to the client's address)."""

    app: App
    home: str  # the home page's URL, ending in "/"
    client: str  # the client's address
    via_caddy: bool

    def safe_next(self, url: str) -> str:
        if self.via_caddy:
            return _safe_next(self.app, url)
        # On TCP only a path of this listener: "//x" and "/\\x" lead elsewhere.
        if (
            url.startswith("/")
            and not url.startswith(("//", "/\\"))
            and len(url) <= 4000
            and not any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in url)
        ):
            return url
        return self.home

    def cookies(self, value: str, max_age: int) -> list[str]:
        if self.via_caddy:
            # The domain's cookie for workspace URLs, and a host-only one den's own pages
            # read (a workspace's page can set the first for the domain, not the second).
            own = (
                f"{HOST_COOKIE}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax"
            )
            return [_session_cookie(self.app, value, max_age), own]
        secure = "; Secure" if self.home.startswith("https:") else ""
        return [
            f"{weblogin.COOKIE}={value}; Path=/; Max-Age={max_age}{secure}; HttpOnly; SameSite=Lax"
        ]


def door(request: web.Request) -> Door:
    from den.web.dash.base import origin_of, remote_of, surface

    s = surface(request)
    return Door(s.app, origin_of(request) + "/", remote_of(request), s.via_caddy)


def _same_origin(request: web.Request, d: Door) -> bool:
    """A form post from den's own page (login CSRF: nobody else may sign you in)."""
    origin = request.headers.get("Origin", "")
    if origin.rstrip("/") == d.home.rstrip("/"):
        return True
    # Browsers send "Origin: null" for a form on a page with "Referrer-Policy: no-referrer"
    # (den's pages); their Sec-Fetch-Site, which no page can set, says where it came from.
    return origin == "null" and request.headers.get("Sec-Fetch-Site") == "same-origin"


async def gate_handler(request: web.Request) -> web.StreamResponse:
    return await _gate(request).check(request)


async def error_handler(request: web.Request) -> web.StreamResponse:
    return await _gate(request).error(request)


async def pages_handler(request: web.Request) -> web.StreamResponse:
    """What the dashboard's routes do not answer at den's domain: nothing."""
    return pages.not_found()


async def login_handler(request: web.Request) -> web.StreamResponse:
    d = door(request)
    if request.method == "POST":
        return await _login_post(request, d)
    return await _login_get(request, d)


async def logout_handler(request: web.Request) -> web.StreamResponse:
    return await _logout(request, door(request))


def add_login_routes(router: web.UrlDispatcher, prefix: str) -> None:
    """Signing in and out at ``prefix``/_den/login and /_den/logout (either listener)."""
    router.add_get(prefix + "/_den/login", login_handler)
    router.add_post(prefix + "/_den/login", login_handler)
    router.add_post(prefix + "/_den/logout", logout_handler)


async def _login_get(request: web.Request, d: Door) -> web.Response:
    app = d.app
    link = request.query.get("t", "")
    nxt = d.safe_next(request.query.get("next", ""))
    if not link:
        host = urlsplit(home_url(app.settings)).hostname or "HOST"
        port = app.ssh_port or app.settings.ssh_port
        body = (
            pages.para("den signs browsers in with your SSH key. In a terminal, run")
            + pages.para(f"ssh -p {port} {host} login")
            + pages.para("and open the link it prints (it works once, for a few minutes).")
        )
        if not d.via_caddy:
            body += pages.para(
                "Here, on den's own listener: open ", d.home + "_den/login?t=…",
                " with the t= part of that link.",
            )  # fmt: skip
        resp = pages.page("Sign in to den", body, 401)
        # A __Host- cookie needs https: on plain http the next link lands at home.
        if nxt != d.home and d.home.startswith("https:"):
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
    csp = pages.SECURITY_HEADERS["Content-Security-Policy"]
    if d.via_caddy:
        csp = csp.replace(
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


async def _login_post(request: web.Request, d: Door) -> web.Response:
    app = d.app
    if not _same_origin(request, d):
        return pages.page("Refused", pages.para("This form must be sent from den's own page."), 403)
    form = await request.post()
    link = str(form.get("t", ""))
    nxt = d.safe_next(str(form.get("next", "")))
    if nxt == d.home and d.via_caddy:
        nxt = d.safe_next(request.cookies.get(NEXT_COOKIE, ""))
    client = d.client
    agent = request.headers.get("User-Agent", "")[:200]
    try:
        value, _expires, name = await weblogin.consume_link(
            app, link, client, agent, bind=not d.via_caddy
        )
    except Unauthenticated as err:
        return pages.page("Link not valid", pages.para(err.message), 401)
    max_age = max(1, int(app.settings.web_session_days * 86400))
    resp = web.Response(status=303, headers={"Location": nxt, "Cache-Control": "no-store"})
    for cookie in d.cookies(value, max_age):
        resp.headers.add("Set-Cookie", cookie)
    if d.via_caddy:
        resp.del_cookie(NEXT_COOKIE, secure=True, httponly=True, samesite="Lax")
    log.info("browser signed in", extra={"ctx": {"user": name}})
    return resp


async def _logout(request: web.Request, d: Door) -> web.Response:
    app = d.app
    if not _same_origin(request, d):
        return pages.page("Refused", pages.para("This form must be sent from den's own page."), 403)
    for value in session_values(request):
        who = await weblogin.session_user(app, value, d.client)
        if who is None:
            continue
        caller = Caller(who.name, who.role, Right.write, "web", user_id=who.user_id)
        try:
            await REGISTRY.call(app, caller, "login.revoke", {"id": who.session_id})
        except DenError as err:
            log.warning("sign-out failed: %s", err.message)
    resp = web.Response(status=303, headers={"Location": d.home})
    for cookie in d.cookies("", 0):
        resp.headers.add("Set-Cookie", cookie)
    return resp


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
    from den.mcp import caddy_handler as mcp_caddy_handler
    from den.web import allow

    # The UI allow-list covers den's own pages at the domain, not workspace URLs.
    web_app = web.Application(
        client_max_size=64 * 1024, middlewares=[allow.middleware(app, allow.caddy_remote)]
    )
    web_app[GATE_KEY] = gate
    web_app[SURFACE] = Surface(app, via_caddy=True)
    web_app.router.add_get(GATE, gate_handler)
    web_app.router.add_get(ERROR, error_handler)
    add_login_routes(web_app.router, PAGES)
    dash.add_routes(web_app.router, PAGES)
    web_app.router.add_route("*", PAGES + "/mcp", mcp_caddy_handler)  # MCP (den.mcp.http)
    # Last: any other path at den's domain (the router tries routes in order).
    web_app.router.add_route("*", PAGES + "{tail:.*}", pages_handler)
    return web_app
