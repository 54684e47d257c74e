"""What every dashboard page uses: who the browser is, the CSRF rule, templates, and
calls into the one method registry (the web layer reads and changes nothing itself)."""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlencode

import jinja2
from aiohttp import web

from den.rpc.registry import REGISTRY, Caller, Right
from den.services import weblogin
from den.web import pages
from den.web.caddy_config import PAGES
from den.web.gate import _cookies, one_user
from den.web.urls import home_url

if TYPE_CHECKING:
    from den.app import App

WEB_DIR = Path(__file__).resolve().parent.parent
TEMPLATES = WEB_DIR / "templates"
STATIC = WEB_DIR / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
FLASH = "den_flash"
HOST_COOKIE = "__Host-" + weblogin.COOKIE  # the session cookie of den's domain itself


@dataclass(frozen=True)
class Surface:
    """Which listener an aiohttp app is: through Caddy (den's domain) or den's TCP one."""

    app: App
    via_caddy: bool


SURFACE = web.AppKey("den_dash_surface", Surface)


@dataclass(frozen=True)
class Browser:
    """The browser behind a request: who is signed in (None: nobody), from where."""

    app: App
    caller: Caller | None
    remote: str
    origin: str  # the dashboard's own origin, as this browser reaches it
    via_caddy: bool
    cookies: tuple[str, ...] = ()  # its session cookie values (streams re-check them)

    @property
    def secure(self) -> bool:
        return self.origin.startswith("https:")


def surface(request: web.Request) -> Surface:
    return request.app[SURFACE]


def remote_of(request: web.Request) -> str:
    """The client's address: Caddy's word for it through Caddy (the gate's socket is
    Caddy's alone), the peer's on TCP."""
    if surface(request).via_caddy:
        return request.headers.get("X-Den-Remote", "")
    return request.remote or ""


def origin_of(request: web.Request) -> str:
    s = surface(request)
    if s.via_caddy:
        return home_url(s.app.settings).rstrip("/")
    return f"{request.scheme}://{request.host}"


def session_values(request: web.Request) -> list[str]:
    """The browser's session cookie values for den's own pages. At den's domain only
    the host-only ``__Host-`` one: a workspace's page can set ``den_session`` for the
    whole domain (its owner's session: the victim would act as them), never this."""
    name = HOST_COOKIE if surface(request).via_caddy else weblogin.COOKIE
    return _cookies(request.headers.getall("Cookie", [])).get(name, [])


async def user_of(
    app: App, values: list[str] | tuple[str, ...], remote: str
) -> weblogin.SessionUser | None:
    """The gate's one rule, asked of the database each time (no memo: streams re-check
    with it): at most MAX_COOKIES values, and all the valid ones (for a client at
    ``remote``) the same user."""
    return await one_user(values, lambda value: weblogin.session_user(app, value, remote))


def _caller(who: weblogin.SessionUser, remote: str) -> Caller:
    right = Right.admin if who.role == "admin" else Right.write
    return Caller(who.name, who.role, right, "web", user_id=who.user_id, addr=remote)


async def browser(request: web.Request) -> Browser:
    s = surface(request)
    values = session_values(request)
    remote = remote_of(request)
    who = await user_of(s.app, values, remote) if values else None
    caller = _caller(who, remote) if who is not None else None
    return Browser(s.app, caller, remote, origin_of(request), s.via_caddy, tuple(values))


def sign_in_url(request: web.Request) -> str:
    """The sign-in page, coming back to this page once signed in."""
    path = request.path
    if surface(request).via_caddy:
        path = path.removeprefix(PAGES) or "/"
    here = path + ("?" + request.query_string if request.query_string else "")
    if surface(request).via_caddy:
        here = origin_of(request) + here  # den's domain takes only full URLs of its own
    return "/_den/login?" + urlencode({"next": here})


async def signed_in(request: web.Request, admin: bool = False) -> Browser:
    """The signed-in browser; a stranger is sent to sign in (302), and a member on an
    admin page gets the same 404 as an unknown address."""
    b = await browser(request)
    if b.caller is None:
        raise web.HTTPFound(sign_in_url(request), headers={"Cache-Control": "no-store"})
    if admin and not b.caller.is_admin:
        raise _not_found()
    return b


def _not_found() -> web.HTTPNotFound:
    resp = pages.not_found()
    return web.HTTPNotFound(
        text=resp.text, content_type="text/html", headers=dict(pages.SECURITY_HEADERS)
    )


def same_origin(request: web.Request, b: Browser) -> bool:
    """The CSRF rule of every POST and websocket upgrade: sent by den's own page."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null":
        return origin.rstrip("/") == b.origin
    # No Origin (or "null"): only the browser's own Sec-Fetch-Site, which no page can
    # set, may vouch for it.
    return request.headers.get("Sec-Fetch-Site") == "same-origin"


async def call(b: Browser, method: str, params: dict[str, Any]) -> Any:
    """A registered method, as this browser's user (their rights, their audit trail)."""
    assert b.caller is not None
    return await REGISTRY.call(b.app, b.caller, method, params)


# -- templates -------------------------------------------------------------------------------

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: Any) -> str:
    """An ISO time as 'YYYY-MM-DD HH:MM' UTC ('' for none)."""
    if not value:
        return ""
    text = str(value).replace("T", " ")
    return text[:16] + " UTC"


def _size_mb(value: Any) -> str:
    if value is None:
        return "-"
    mb = int(value)
    return f"{mb / 1024:g} GiB" if mb >= 1024 and mb % 256 == 0 else f"{mb} MiB"


_ENV.filters["when"] = _when
_ENV.filters["mb"] = _size_mb


def flash_name(secure: bool) -> str:
    # Over https a __Host- cookie: no workspace host can plant a message for den's pages.
    return "__Host-" + FLASH if secure else FLASH


def set_flash(resp: web.StreamResponse, b: Browser, ok: bool, text: str) -> None:
    value = quote(("ok:" if ok else "error:") + text[:500], safe="")
    resp.set_cookie(
        flash_name(b.secure), value, max_age=60, path="/", secure=b.secure or None,
        httponly=True, samesite="Strict",
    )  # fmt: skip


def _take_flash(request: web.Request) -> tuple[str, str] | None:
    raw = request.cookies.get(flash_name(origin_of(request).startswith("https:")))
    if not raw:
        return None
    kind, _, text = unquote(raw).partition(":")
    return ("ok" if kind == "ok" else "error", text[:500])


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    """A page from ``template`` (autoescaped; it extends layout.html), with den's CSP."""
    flash = _take_flash(request)
    ctx.setdefault("b", None)
    ctx.setdefault("title", "")
    text = _ENV.get_template(template).render(flash=flash, **ctx)
    resp = web.Response(text=text, status=status, content_type="text/html")
    resp.headers.update(HEADERS)
    if flash is not None:
        secure = origin_of(request).startswith("https:")
        resp.del_cookie(flash_name(secure), path="/", secure=secure or None)
    return resp


# -- static files ----------------------------------------------------------------------------

TYPES = {".js": "text/javascript", ".css": "text/css", ".map": "application/json"}


async def static_handler(request: web.Request) -> web.StreamResponse:
    """Files of src/den/web/static alone (nothing outside it, however the path is spelt)."""
    rel = request.match_info.get("path", "")
    try:
        path = (STATIC / rel).resolve()
    except (OSError, ValueError):
        raise web.HTTPNotFound() from None
    if not path.is_relative_to(STATIC.resolve()) or not path.is_file():
        raise web.HTTPNotFound()
    ctype = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0]
    return web.FileResponse(
        path,
        headers={
            "Content-Type": ctype or "application/octet-stream",
            "Cache-Control": "public, max-age=3600",
            "X-Content-Type-Options": "nosniff",
        },
    )
