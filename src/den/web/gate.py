"""den's side of every request to a workspace URL: who is this, may they, wake it.

Caddy calls :func:`gate` (no body, the client's request described in
``X-Den-*`` headers) before it proxies anything. A 200 lets the request
through to the upstream den names; any other answer is what the client gets.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode

from aiohttp import web
from sqlalchemy import update

from den import tasks
from den.db.models import BrowserSession
from den.errors import DenError, Unauthenticated
from den.rpc.authlimit import AuthFailures
from den.rpc.registry import REGISTRY, Caller, Context, Right
from den.services import sharing, weblogin
from den.services.revocation import Revoked
from den.services.tokens import TOKEN_PREFIX, authenticate
from den.web import pages
from den.web.access import Directory, WsView
from den.web.jwt import bearer_caller
from den.web.urls import base, home_url
from den.web.visits import Visits

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
SHARE_PARAM = "den_share"
SHARE_COOKIE = "__Host-den_share"
# Wakes and starts on behalf of a visitor are den's own doing.
WEB = Caller("den-web", "admin", Right.admin, "web")
MAX_COOKIES = 4  # den_session values looked at in one request
MAX_CREDENTIAL = 512  # longer cookie or bearer values are no credential of den's
START_EVERY = 60.0  # seconds between starts of one stopped workspace by its URL


@dataclass(frozen=True)
class Who:
    """A den user a request stands for, and how it proved it."""

    user_id: int
    name: str
    role: str
    via: str  # session | tcp (a den token) | jwt
    right: Right


class Gate:
    def __init__(self, app: App) -> None:
        self.app = app
        self.dir = Directory(app)
        self.visits = Visits()
        self._started: dict[str, float] = {}  # when a request last started a workspace
        # Bad session cookies and bearer credentials per client address: past the
        # limit, unknown ones are not looked up (the database is no one's to flood).
        self.failures = AuthFailures(
            app.settings.api_max_auth_failures, app.settings.api_auth_failure_window
        )
        app.revocations.subscribe(self._revoked)

    def _revoked(self, ev: Revoked) -> None:
        """A key removed: the browsers it signed in may have been the thief's; sign them out."""
        if ev.kind == "key":
            tasks.spawn(self._sign_out(ev.user_id), f"web-sign-out-{ev.user_id}")

    async def _sign_out(self, user_id: int) -> None:
        now = datetime.now(UTC)
        async with self.app.sessions() as db:
            await db.execute(
                update(BrowserSession)
                .where(BrowserSession.user_id == user_id, BrowserSession.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            await db.commit()
        self.app.web_changed()

    # -- credentials -----------------------------------------------------------------

    async def _session(self, value: str, remote: str) -> Who | None:
        async def load() -> Who | None:
            s = await weblogin.session_user(self.app, value, remote)
            if s is None:
                return None
            right = Right.admin if s.role == "admin" else Right.write
            return Who(s.user_id, s.name, s.role, "session", right)

        # Keyed by the address too: a session bound to one client address is no one's
        # from another, and a remembered answer must not say otherwise.
        return await self.dir.memo.get(("session", value, remote), load)

    async def _bearer(self, header: str) -> Who | None:
        async def load() -> Who | None:
            try:
                if header.partition(" ")[2].strip().startswith(TOKEN_PREFIX):
                    caller = await authenticate(self.app, header)
                else:
                    caller = await bearer_caller(self.app, header)
            except Unauthenticated:
                return None
            if caller is None or caller.user_id is None:
                return None
            return Who(caller.user_id, caller.name, caller.role, caller.via, caller.right)

        return await self.dir.memo.get(("bearer", header), load)

    async def _link(self, ws_id: str, value: str) -> bool:
        async def load() -> bool:
            return await sharing.link_ok(self.app, ws_id, value) is not None

        return await self.dir.memo.get(("link", ws_id, value), load)

    async def _signed_in(self, values: list[str], remote: str) -> Who | None:
        return await one_user(values, lambda value: self._session(value, remote))

    # -- the check -----------------------------------------------------------------------

    async def check(self, request: web.Request) -> web.StreamResponse:
        h = request.headers
        settings = self.app.settings
        host = h.get("X-Den-Host", "").lower().rstrip(".")
        uri = h.get("X-Den-Uri", "/")
        if not _clean_path(uri):
            self.app.metrics.http_refused.labels("bad-path").inc()
            return pages.page("Bad request", pages.para("This path is not allowed."), 400)
        site = await self.dir.site(host)
        ws = None if site is None else await self.dir.workspace(site.ws_id)
        if ws is not None and ws.state in ("deleting", "creating"):
            ws = None
        if ws is None and not host.endswith("." + settings.domain):
            self.app.metrics.http_refused.labels("unknown-host").inc()
            return pages.not_found()
        url = base(settings, host) + uri
        query = uri.partition("?")[2]
        if SHARE_PARAM in query:
            # The same page for a bad link to a workspace that does not exist.
            return await self._take_link(ws, uri, query)

        remote = h.get("X-Den-Remote", "")
        who: Who | None = None
        auth = h.get("Authorization", "")
        scheme, _, credential = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            who = await self._bearer(auth) if len(auth) <= MAX_CREDENTIAL else None
            if who is None:
                return self._bad_bearer(remote)
        cookies = _cookies(h.getall("Cookie", []))
        # den's cookies act only for requests this site's own pages make, or for a
        # plain navigation to it: another workspace's page cannot use them.
        ambient = _ambient_ok(h, base(settings, host))
        if not ambient and any(_is_den(name) for name in cookies) and who is None:
            refused = ws is None or self._how(ws, None) is None
            if refused:  # the same answer whether or not the workspace exists
                self.app.metrics.http_refused.labels("cross-site").inc()
                return pages.page(
                    "Refused",
                    pages.para("A request from another site may not use your den sign-in here."),
                    403,
                )
        if who is None and ambient:
            who = await self._signed_in(cookies.get(weblogin.COOKIE, []), remote)

        if ws is None:
            # The same answer for every name: a stranger learns nothing of which exist.
            self.app.metrics.http_refused.labels("unknown-host").inc()
            return pages.not_found() if who is not None else self._to_login(url)
        how = self._how(ws, who)
        if how in (None, "public") and ambient:
            links = cookies.get(SHARE_COOKIE, [])
            if links and len(links[0]) <= MAX_CREDENTIAL and await self._link(ws.id, links[0]):
                how = "link"
        if how is None:
            if who is not None:
                self.app.metrics.http_refused.labels("not-shared").inc()
                return pages.not_found()
            self.app.metrics.http_refused.labels("signed-out").inc()
            return self._to_login(url)

        woken = await self._wake(ws, how)
        if woken is not None:
            return woken
        port = site.port if site is not None and site.port else ws.http_port
        # A visitor is named to the app only when let in as themselves: a public
        # page or a link does not learn which den user opened it.
        named = who.name if who is not None and how in ("owner", "admin", "user") else ""
        self.app.activity.touch(ws.id, "http")
        self.app.metrics.http_requests.labels(ws.ref, how).inc()
        self.visits.seen(ws.id, ws.ref, named, how, remote)
        resp = web.Response(status=200)
        resp.headers["X-Den-Upstream"] = f"{ws.address}:{port}"
        resp.headers["X-Den-User"] = named
        resp.headers["X-Den-Share"] = how
        resp.headers["X-Den-Cookie"] = _without_den(h.getall("Cookie", []))
        # A den token or a JWT never reaches an app, whatever the scheme it came in.
        keep = who is None and TOKEN_PREFIX not in auth
        resp.headers["X-Den-Authorization"] = auth if keep else ""
        return resp

    def _bad_bearer(self, remote: str) -> web.Response:
        """A bearer that is no credential of den's; answered at once while its address
        keeps sending bad ones (a good one is still looked up: nobody is locked out)."""
        self.app.metrics.http_refused.labels("bad-credential").inc()
        wait = self.failures.retry_after(remote)
        self.failures.failed(remote)
        if wait:
            return pages.page(
                "Too many failed sign-ins",
                pages.para(f"Too many bad credentials from {remote}; retry in {wait} s."),
                429,
                {"Retry-After": str(wait)},
            )
        return pages.page(
            "Not signed in",
            pages.para("The bearer credential was not accepted (unknown, expired or revoked)."),
            401,
            {"WWW-Authenticate": "Bearer"},
        )

    def _how(self, ws: WsView, who: Who | None) -> str | None:
        """How ``who`` may open the workspace's URLs (a read-only token may not)."""
        if who is not None and who.right >= Right.write:
            if who.user_id == ws.owner_id:
                return "owner"
            if who.role == "admin" and who.right >= Right.admin:
                return "admin"
            if ws.share_mode == "users" and who.user_id in ws.shared_with:
                return "user"
        if ws.share_mode == "public":
            return "public"
        return None

    def _to_login(self, url: str) -> web.Response:
        login = home_url(self.app.settings) + "_den/login?" + urlencode({"next": url})
        return web.Response(
            status=302,
            headers={"Location": login, "Cache-Control": "no-store"},
            text="Sign in to den first: " + login + "\n",
        )

    async def _take_link(self, ws: WsView | None, uri: str, query: str) -> web.Response:
        pairs = parse_qsl(query, keep_blank_values=True)
        values = [v for k, v in pairs if k == SHARE_PARAM]
        rest = [(k, v) for k, v in pairs if k != SHARE_PARAM]
        good = (
            ws is not None
            and len(values) == 1
            and len(values[0]) <= MAX_CREDENTIAL
            and await self._link(ws.id, values[0])
        )
        if not good:
            self.app.metrics.http_refused.labels("bad-link").inc()
            return pages.page(
                "Link not valid",
                pages.para("This share link does not exist or was revoked; ask for a new one."),
                403,
            )
        path = uri.partition("?")[0] or "/"
        target = path + ("?" + urlencode(rest) if rest else "")
        # The secret leaves the URL (history, Referer) for a cookie of this host alone.
        cookie = f"{SHARE_COOKIE}={values[0]}; Path=/; Secure; HttpOnly; SameSite=Lax"
        return web.Response(
            status=302,
            headers={"Location": target, "Set-Cookie": cookie, "Cache-Control": "no-store"},
        )

    async def _wake(self, ws: WsView, how: str) -> web.Response | None:
        """Make the workspace run for this request; a page when it cannot (what went
        wrong is told to its owner and admins only)."""
        insider = how in ("owner", "admin")
        if ws.state == "running":
            return None
        if ws.state in ("stopped", "failed"):
            now = time.monotonic()
            recent = now - self._started.get(ws.id, -START_EVERY) < START_EVERY
            if ws.state == "failed" or not self.app.settings.web_start_stopped or recent:
                return pages.page(
                    "Workspace stopped",
                    pages.para(
                        f"The workspace {ws.ref} is {ws.state}. Its owner ({ws.owner}) or an admin can start it with "
                    )
                    + pages.para(f"den start {ws.ref}"),
                    503,
                    {"Retry-After": "30"},
                )
            self._started[ws.id] = now
            try:
                await REGISTRY.call(self.app, WEB, "workspace.start", {"ref": ws.ref})
            except DenError as err:
                why = err.message if insider else "it did not start; its owner can see why"
                return pages.page("Workspace did not start", pages.para(f"{ws.ref}: {why}"), 503)
            return None
        if ws.state == "suspended":
            from den.services.power import ensure_running
            from den.services.workspaces import find_workspace

            ctx = Context(self.app, WEB, REGISTRY.get("workspace.resume"))
            try:
                row, owner = await find_workspace(ctx, ws.ref)
                await ensure_running(ctx, row, owner, "http")
            except DenError as err:
                why = err.message if insider else "it did not wake; its owner can see why"
                return pages.page("Workspace did not wake", pages.para(f"{ws.ref}: {why}"), 503)
            finally:
                await ctx.db.close()
            # Running now (committed): the next request need not read it again.
            self.dir.memo.put(("ws", ws.id), dataclasses.replace(ws, state="running"))
            return None
        return pages.page("Workspace busy", pages.para(f"{ws.ref} is {ws.state}."), 503)

    # -- Caddy's own errors --------------------------------------------------------------

    async def error(self, request: web.Request) -> web.Response:
        h = request.headers
        try:
            status = int(h.get("X-Den-Status", "502"))
        except ValueError:
            status = 502
        status = status if 400 <= status <= 599 else 502
        site = await self.dir.site(h.get("X-Den-Host", "").lower())
        ws = None if site is None else await self.dir.workspace(site.ws_id)
        if status == 502 and site is not None and ws is not None:
            port = site.port or ws.http_port
            self.app.metrics.http_refused.labels("no-listener").inc()
            return pages.page(
                "Nothing is listening",
                pages.para(
                    f"The workspace {ws.ref} does not answer on port {port}. Start a server there "
                    f"that listens on every address (0.0.0.0:{port}, not only 127.0.0.1), e.g. "
                )
                + pages.para(f"python3 -m http.server {port}"),
                502,
            )
        if status == 404 or site is None:
            return pages.not_found()
        return pages.page("Error", pages.para(f"The request failed ({status})."), status)


class _OfUser(Protocol):
    @property
    def user_id(self) -> int: ...


U = TypeVar("U", bound=_OfUser)


async def one_user(values: Sequence[str], lookup: Callable[[str], Awaitable[U | None]]) -> U | None:
    """The user of the session cookies ``values`` (each looked up): only when every
    value is looked at and all the valid ones are the same user (a workspace's script
    can add cookies for den's domain, never choose who you are)."""
    if len(values) > MAX_COOKIES:
        return None
    users: dict[int, U] = {}
    for value in values:
        if len(value) > MAX_CREDENTIAL:
            continue
        who = await lookup(value)
        if who is not None:
            users[who.user_id] = who
    return next(iter(users.values())) if len(users) == 1 else None


def _ambient_ok(h: Any, origin: str) -> bool:
    """Whether den's cookies may act for this request: the site's own page asked, or
    the user opened it (a link, the address bar) as a page of its own; never another
    site's script, form post, frame or websocket."""
    site = h.get("Sec-Fetch-Site")
    safe = h.get("X-Den-Method") in ("GET", "HEAD")
    if site is not None:
        if site in ("same-origin", "none"):
            return True
        return bool(
            safe
            and h.get("Sec-Fetch-Mode") == "navigate"
            and h.get("Sec-Fetch-Dest", "document") == "document"
        )
    # A client without Sec-Fetch-* (curl, an old browser): another origin never;
    # no origin at all only for a safe method.
    sent = h.get("Origin")
    return sent == origin or (sent is None and safe)


def _clean_path(uri: str) -> bool:
    """No ``..`` segment (also %-encoded, with backslashes or a ``;`` suffix), no NUL, no
    control bytes."""
    path = uri.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        return False
    decoded = path
    for _ in range(3):  # %252e%252e as well
        once = unquote(decoded)
        if once == decoded:
            break
        decoded = once
    if any(ord(c) < 0x20 or c == "\x7f" for c in decoded):
        return False
    segments = decoded.replace("\\", "/").split("/")
    return all(seg.partition(";")[0] != ".." for seg in segments)


def _cookies(headers: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for header in headers:
        for part in header.split(";"):
            name, sep, value = part.strip().partition("=")
            if sep:
                out.setdefault(name, []).append(value)
    return out


def _is_den(name: str) -> bool:
    return name.removeprefix("__Host-").removeprefix("__Secure-").startswith("den_")


def _without_den(headers: list[str]) -> str:
    """The Cookie header without den's own cookies (the app never sees them)."""
    kept = []
    for header in headers:
        for part in header.split(";"):
            name = part.strip().partition("=")[0]
            if part.strip() and not _is_den(name):
                kept.append(part.strip())
    return "; ".join(kept)
