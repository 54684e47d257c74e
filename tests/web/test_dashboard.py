"""The web dashboard in a real browser (Debian's Chromium, headless, through Playwright)
against the pool daemon's real Caddy and its TCP listener."""

from __future__ import annotations

import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from playwright.sync_api import Page

from den.rpc.registry import REGISTRY
from den.services import load_all
from tests.conftest import Daemon
from tests.web.conftest import NewPage, Web, goto, login_link, serve_files, sign_in
from tests.workspaces.conftest import Users, create

load_all()


def tcp_link(d: Daemon, link: str) -> str:
    """The one-time link, on den's TCP listener instead of its domain."""
    return d.http_url + "/_den/login?t=" + link.split("t=", 1)[1]


@pytest.fixture
def member(users: Users) -> str:
    return users.make("member")


@pytest.fixture
def admin(users: Users) -> str:
    return users.make("admin")


def signed_in_page(d: Daemon, web: Web, new_page: NewPage, user: str) -> Page:
    page = new_page()
    sign_in(page, web, login_link(d, user))
    return page


# -- what is on the pages --------------------------------------------------------------------


class Forms(HTMLParser):
    """Every <form>'s method and action on a page."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "form":
            a = dict(attrs)
            self.forms.append(((a.get("method") or "get").lower(), a.get("action") or ""))


def forms_of(html: str) -> list[tuple[str, str]]:
    p = Forms()
    p.feed(html)
    return p.forms


def png_not_blank(path: Path) -> None:
    """A screenshot with something on it: a real PNG, of size, in more than one colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, (path, len(data))
    # The pixels: IDAT chunks, inflated; more than one distinct byte value in the rows.
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    pixels = zlib.decompress(idat)
    assert len(set(pixels[:200_000])) > 8, path


# -- tests -----------------------------------------------------------------------------------


def test_sign_in_with_a_link_shows_my_workspaces(
    pool_daemon: Daemon, web: Web, member: str, new_page: NewPage
) -> None:
    page = signed_in_page(pool_daemon, web, new_page, member)
    assert page.title() == "Workspaces · den"
    assert page.get_by_role("heading", name="My workspaces").is_visible()
    assert f"Signed in as {member}" in page.inner_text("header")


def test_dashboard_on_the_tcp_listener(
    pool_daemon: Daemon, web: Web, member: str, new_page: NewPage
) -> None:
    page = new_page()
    # A stranger is sent to the sign-in page, which says how to sign in here.
    resp = goto(page, pool_daemon.http_url + "/tokens")
    assert resp.status == 401 and page.url.startswith(pool_daemon.http_url + "/_den/login?")
    assert pool_daemon.http_url + "/_den/login?t=" in page.inner_text("body")
    link = tcp_link(pool_daemon, login_link(pool_daemon, member))
    goto(page, link)
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()
    assert page.url == pool_daemon.http_url + "/", page.url
    assert f"Signed in as {member}" in page.inner_text("header")
    cookies = page.context.cookies()
    mine = [c for c in cookies if c["name"] == "den_session"]
    assert len(mine) == 1 and mine[0]["domain"] == "127.0.0.1" and not mine[0]["secure"]
    assert mine[0]["httpOnly"]


def wait_text(page: Page, selector: str, text: str, timeout: float = 30_000) -> None:
    page.wait_for_function(
        "([sel, text]) => { const el = document.querySelector(sel);"
        " return el !== null && el.textContent.trim() === text; }",
        arg=[selector, text],
        timeout=timeout,
    )


def test_create_from_the_dashboard_and_watch_its_state_live(
    pool_daemon: Daemon, web: Web, member: str, web_bb: str, new_page: NewPage
) -> None:
    page = signed_in_page(pool_daemon, web, new_page, member)
    # A bad name: the registry's own words come back, and nothing is made.
    page.get_by_label("Name").fill("Bad Name!")
    page.get_by_label("Image").select_option(web_bb)
    with page.expect_navigation():
        page.get_by_role("button", name="Create").click()
    assert "Invalid params" in page.inner_text(".flash.error")
    assert pool_daemon.call("workspace.list", user=member) == []

    page.get_by_label("Name").fill("app")
    page.get_by_label("Image").select_option(web_bb)
    with page.expect_navigation():
        page.get_by_role("button", name="Create").click()
    assert page.url == web.home
    assert "workspace.create app: done" in page.inner_text(".flash.ok")
    ref = f"{member}/app"
    cell = f"tr[data-id='{ref}'] [data-field=state]"
    wait_text(page, cell, "running")

    # Changes made elsewhere (here: over the API) reach the open page without a reload.
    page.evaluate("window.denMark = 'same page'")
    page.wait_for_function("window.denEvents && window.denEvents.readyState === 1")
    pool_daemon.call("workspace.suspend", ref=ref)
    wait_text(page, cell, "suspended")
    pool_daemon.call("workspace.resume", ref=ref)
    wait_text(page, cell, "running")
    assert page.evaluate("window.denMark") == "same page"

    # Its page, and an action from it: stop, then back to it with the state shown.
    goto(page, web.home + f"w/{ref}")
    assert page.title() == f"{ref} · den"
    assert page.locator(".flash").count() == 0  # a message is shown once
    page.get_by_label("Suspend after").fill("30m")
    with page.expect_navigation():
        page.get_by_role("button", name="Set").first.click()
    assert "suspends after 30m idle" in page.inner_text(".flash.ok")
    with page.expect_navigation():
        page.get_by_role("button", name="Stop").click()
    assert page.url == web.home + f"w/{ref}"
    assert pool_daemon.call("workspace.get", ref=ref)["state"] == "stopped"
    assert page.inner_text(".facts [data-field=state]") == "stopped"


def test_a_member_cannot_see_another_members_workspace(
    pool_daemon: Daemon, web: Web, users: Users, web_bb: str, new_page: NewPage
) -> None:
    owner, other = users.make("member"), users.make("member")
    create(pool_daemon, owner, "secret", image=web_bb)
    page = signed_in_page(pool_daemon, web, new_page, other)
    resp = goto(page, web.home + f"w/{owner}/secret")
    assert resp.status == 404 and "Not found" in page.title()
    assert owner not in page.content()
    resp = goto(page, web.home + f"w/{owner}/nothing-here")
    assert resp.status == 404
    resp = goto(page, web.home + "admin")
    assert resp.status == 404
    goto(page, web.home)
    assert f"{owner}/secret" not in page.content()
    # The event stream says nothing of it either.
    events = page.evaluate(
        """() => new Promise((resolve) => {
            const es = new EventSource("/_den/events?kinds=workspace&all=1");
            const got = [];
            es.onmessage = (e) => got.push(JSON.parse(e.data));
            setTimeout(() => { es.close(); resolve(got); }, 2500);
        })"""
    )
    assert all(e["id"].split("/")[0] == other for e in events), events


def test_a_form_post_from_another_origin_is_refused(
    pool_daemon: Daemon, web: Web, member: str, web_bb: str
) -> None:
    cookie = web.login_cookie(member)
    url = web.home + "_den/do/workspace.create"
    form = ["--data-urlencode", "name=evil", "--data-urlencode", f"image={web_bb}"]
    workspace_origin = web.url(member, "app").rstrip("/")
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": workspace_origin},  # a page on a workspace URL: same site, not den's origin
        {"Origin": "null", "Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site"},
        {},
    ):
        reply = web.curl(url, *form, headers=headers, cookie=cookie)
        assert reply.status == 403, (headers, reply.status, reply.text)
    assert pool_daemon.call("workspace.list", user=member) == []
    # Den's own page's post goes through (the same request, from den's origin).
    reply = web.curl(url, *form, headers={"Origin": web.home.rstrip("/")}, cookie=cookie)
    assert reply.status == 303, reply.text
    assert [w["name"] for w in pool_daemon.call("workspace.list", user=member)] == ["evil"]
    # Unknown methods and signed-out posts.
    origin = {"Origin": web.home.rstrip("/"), "Accept": "application/json"}
    assert web.curl(web.home + "_den/do/no.such", headers=origin, cookie=cookie).status == 404
    reply = web.curl(url, *form, headers=origin)
    assert reply.status == 401 and reply.json()["error"]["message"] == "not signed in"
    # A script of den's page posts JSON and gets JSON: the result, or the error.
    body = '{"ref": "evil"}'
    js = {**origin, "Content-Type": "application/json"}
    reply = web.curl(web.home + "_den/do/workspace.stop", "--data", body, headers=js, cookie=cookie)
    assert reply.status == 200 and reply.json()["result"]["state"] == "stopped", reply.text
    reply = web.curl(web.home + "_den/do/workspace.stop", "--data", '{"ref": 5}', headers=js,
                     cookie=cookie)  # fmt: skip
    assert reply.status == 400 and reply.json()["error"]["message"] == "Invalid params"

    # Static files: den's own, typed; nothing beside them.
    reply = web.curl(web.home + "_den/static/den.js")
    assert reply.status == 200 and reply.header("content-type").startswith("text/javascript")
    for path in ("_den/static/../server.py", "_den/static/%2e%2e/server.py", "_den/static/x"):
        reply = web.curl(web.home + path, "--path-as-is")
        assert reply.status == 404 and b"import" not in reply.body, (path, reply.status)


MEMBER_PAGES = ["/", "/w/{user}/app", "/keys", "/tokens", "/audit"]
ADMIN_PAGES = [
    "/admin", "/admin/users", "/admin/workspaces", "/admin/sessions", "/admin/images",
    "/admin/jobs", "/admin/audit", "/admin/node", "/admin/ui", "/admin/metrics/{user}/app",
]  # fmt: skip


def test_every_page_renders_and_every_form_calls_a_registered_method(
    pool_daemon: Daemon, web: Web, users: Users, web_bb: str, new_page: NewPage, tmp_path: Path
) -> None:
    seen = 0
    for role in ("member", "admin"):
        user = users.make(role)
        create(pool_daemon, user, "app", image=web_bb)
        pool_daemon.call("workspace.stop", ref=f"{user}/app")  # lighter; its page is the same
        page = signed_in_page(pool_daemon, web, new_page, user)
        paths = MEMBER_PAGES + (ADMIN_PAGES if role == "admin" else [])
        for path in (p.format(user=user) for p in paths):
            resp = goto(page, web.home + path.lstrip("/"))
            if path.startswith("/admin") and resp.status == 404:
                continue  # an admin page not built (yet): nothing to check
            assert resp.status == 200, (role, path, resp.status)
            html = page.content()
            forms = forms_of(html)
            assert forms, (role, path)  # at least sign-out
            for method, action in forms:
                if method == "get" and action == path:
                    continue  # a filter form (admin pages): it reads, back to this page
                assert method == "post", (path, action)
                if action == "/_den/logout":
                    continue
                assert action.startswith("/_den/do/"), (path, action)
                assert action.removeprefix("/_den/do/") in REGISTRY.methods, (path, action)
                seen += 1
            shot = tmp_path / f"{role}{path.replace('/', '_')}.png"
            page.screenshot(path=str(shot), full_page=True)
            png_not_blank(shot)
        if role == "member":
            # Admin pages are not there for a member: the same 404 as any unknown address.
            for path in ("/admin", "/admin/users"):
                assert goto(page, web.home + path.lstrip("/")).status == 404
    assert seen > 20


def test_a_token_secret_is_shown_once(
    pool_daemon: Daemon, web: Web, member: str, new_page: NewPage
) -> None:
    page = signed_in_page(pool_daemon, web, new_page, member)
    goto(page, web.home + "tokens")
    page.get_by_label("Description").fill("from the dashboard")
    with page.expect_navigation() as nav:
        page.get_by_role("button", name="Create token").click()
    resp = nav.value
    assert resp is not None and resp.status == 200
    assert resp.headers["cache-control"] == "no-store"
    secret = page.input_value("#secret")
    assert secret.startswith("den_") and len(secret) > 30, secret
    (token,) = pool_daemon.call("token.list", user=member)
    assert token["description"] == "from the dashboard"
    goto(page, web.home + "tokens")
    assert secret not in page.content() and "from the dashboard" in page.inner_text("main")
    # Revoke it from its row (a confirmation first).
    page.once("dialog", lambda d: d.accept())
    with page.expect_navigation():
        page.get_by_role("button", name="Revoke").click()
    assert pool_daemon.call("token.list", user=member)[0]["state"] == "revoked"


def test_event_streams_are_bounded_and_end_when_the_session_is_revoked(
    pool_daemon: Daemon, member: str
) -> None:
    import asyncio
    import concurrent.futures
    import time

    import aiohttp

    base = pool_daemon.http_url
    t = login_link(pool_daemon, member).split("t=", 1)[1]

    async def run() -> None:
        jar = aiohttp.CookieJar(unsafe=True)  # a cookie for an IP address
        async with aiohttp.ClientSession(base, cookie_jar=jar) as http:
            async with http.post(
                "/_den/login", data={"t": t}, headers={"Origin": base}, allow_redirects=False
            ) as r:
                assert r.status == 303, await r.text()
            streams = []
            for _ in range(8):
                r = await http.get("/_den/events")
                assert r.status == 200 and r.content_type == "text/event-stream"
                streams.append(r)
            async with http.get("/_den/events") as r:
                assert r.status == 429
            # Signed out (through the registry, as `den logout` does): every stream ends.
            (session,) = [s for s in pool_daemon.call("login.list") if s["user"] == member]
            pool_daemon.call("login.revoke", id=session["id"])
            start = time.monotonic()
            for r in streams:
                async with asyncio.timeout(15):
                    while await r.content.readany():
                        pass
                r.release()
            assert time.monotonic() - start < 12
            async with http.get("/_den/events", allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"].startswith("/_den/login")

    # In a thread of its own: Playwright's sync API keeps an event loop on this one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()


# -- where a session cookie is good ----------------------------------------------------------


def tcp_session(d: Daemon, web: Web, user: str, source: str) -> str:
    """Sign in on den's TCP listener with curl from the address ``source``: the value
    of its host-only cookie."""
    t = login_link(d, user).split("t=", 1)[1]
    reply = web.curl(
        d.http_url + "/_den/login", "--interface", source, "--data-urlencode", f"t={t}",
        headers={"Origin": d.http_url},
    )  # fmt: skip
    assert reply.status == 303, reply.text
    (cookie,) = [c for c in reply.headers.get("set-cookie", []) if c.startswith("den_session=")]
    assert "domain=" not in cookie.lower()
    return cookie.split(";", 1)[0].split("=", 1)[1]


def test_a_tcp_listener_session_works_only_from_the_address_it_signed_in_from(
    pool_daemon: Daemon, web: Web, member: str
) -> None:
    # The TCP listener's cookie goes to every port of its host (a workspace's dev server
    # forwarded with ssh -L too): replayed from elsewhere, it is no one's.
    tcp = pool_daemon.http_url
    value = tcp_session(pool_daemon, web, member, "127.0.0.2")
    jar = f"den_session={value}"
    token = ["--data-urlencode", "right=admin", "--data-urlencode", "description=stolen"]
    as_json = {"Origin": tcp, "Accept": "application/json"}

    def dashboard(source: str) -> int:
        return web.curl(tcp + "/tokens", "--interface", source, cookie=jar).status

    assert dashboard("127.0.0.2") == 200
    assert dashboard("127.0.0.1") == 302
    reply = web.curl(tcp + "/_den/do/token.create", "--interface", "127.0.0.1", *token,
                     headers=as_json, cookie=jar)  # fmt: skip
    assert reply.status == 401, reply.text
    events = web.curl(tcp + "/_den/events", "--interface", "127.0.0.1", cookie=jar)
    assert events.status == 302
    # Through Caddy (which sees 127.0.0.1), as den's page's cookie or a workspace URL's.
    apex = f"__Host-den_session={value}"
    assert web.curl(web.home + "tokens", cookie=apex).status == 302
    reply = web.curl(web.home + "_den/do/token.create", *token, cookie=apex,
                     headers={"Origin": web.home.rstrip("/"), "Accept": "application/json"})  # fmt: skip
    assert reply.status == 401, reply.text
    # A workspace that is not there: 404 for a signed-in user, sign in for a stranger.
    assert web.curl(web.url(member, "nothing"), cookie=jar).status == 302
    assert pool_daemon.call("token.list", user=member) == []
    # From its own address it acts, on TCP and through Caddy alike.
    reply = web.curl(tcp + "/_den/do/token.create", "--interface", "127.0.0.2",
                     "--data-urlencode", "description=mine", headers=as_json, cookie=jar)  # fmt: skip
    assert reply.status == 200 and reply.json()["result"]["description"] == "mine", reply.text
    here = tcp_session(pool_daemon, web, member, "127.0.0.1")
    assert web.curl(web.home + "tokens", cookie=f"__Host-den_session={here}").status == 200
    assert web.curl(web.url(member, "nothing"), cookie=f"den_session={here}").status == 404
    assert web.curl(web.home + "tokens", "--interface", "127.0.0.2",
                    cookie=f"__Host-den_session={here}").status == 302  # fmt: skip
    assert [t["description"] for t in pool_daemon.call("token.list", user=member)] == ["mine"]


def test_den_pages_read_only_their_own_host_cookie(
    pool_daemon: Daemon, web: Web, users: Users, web_bb: str
) -> None:
    # A workspace's page can set den_session for the whole domain (its owner's valid
    # session): den's own pages do not take it, its owner's workspace URLs still do.
    owner, victim = users.make("member"), users.make("member")
    create(pool_daemon, owner, "app", image=web_bb)
    serve_files(pool_daemon, f"{owner}/app")
    theirs, mine = web.login_cookie(owner), web.login_cookie(victim)
    tossed = theirs.split(";", 1)[0]
    assert tossed.startswith("den_session=")
    reply = web.curl(web.home, cookie=tossed)
    assert reply.status == 302 and "/_den/login?next=" in reply.header("location")
    form = ["--data-urlencode", "description=planted"]
    reply = web.curl(web.home + "_den/do/token.create", *form, cookie=tossed,
                     headers={"Origin": web.home.rstrip("/"), "Accept": "application/json"})  # fmt: skip
    assert reply.status == 401 and pool_daemon.call("token.list", user=owner) == []
    assert "hello from den" in web.curl(web.url(owner, "app"), cookie=tossed).text
    # A signed-in victim stays themselves on den's pages whatever den_session is added.
    reply = web.curl(web.home, cookie=f"{tossed}; {mine}")
    assert reply.status == 200 and f"Signed in as <strong>{victim}</strong>" in reply.text
    # Signing out takes the host cookie's session, and clears both cookies.
    reply = web.curl(web.home + "_den/logout", "-X", "POST", cookie=f"{tossed}; {mine}",
                     headers={"Origin": web.home.rstrip("/")})  # fmt: skip
    assert reply.status == 303
    cleared = {c.split("=", 1)[0]: c for c in reply.headers.get("set-cookie", [])}
    assert "Max-Age=0" in cleared["den_session"] and "Max-Age=0" in cleared["__Host-den_session"]
    assert f"Domain={web.home.split('//')[1].split(':')[0]}" in cleared["den_session"]
    assert "Domain" not in cleared["__Host-den_session"]
    states = {s["user"]: s["state"] for s in pool_daemon.call("login.list")
              if s["user"] in (owner, victim)}  # fmt: skip
    assert states == {owner: "active", victim: "revoked"}, states


def test_signing_in_through_caddy_sets_both_cookies_and_signing_out_clears_them(
    pool_daemon: Daemon, web: Web, member: str, new_page: NewPage
) -> None:
    page = signed_in_page(pool_daemon, web, new_page, member)
    host = web.home.split("//")[1].split(":")[0]
    jar = {c["name"]: c for c in page.context.cookies() if "den_session" in c["name"]}
    assert jar.keys() == {"den_session", "__Host-den_session"}, jar
    domain_wide, own = jar["den_session"], jar["__Host-den_session"]
    assert domain_wide["value"] == own["value"]
    assert domain_wide["domain"] == "." + host and own["domain"] == host
    assert all(c["secure"] and c["httpOnly"] and c["path"] == "/" for c in jar.values())
    assert own["sameSite"] == "Lax"
    with page.expect_navigation():
        page.get_by_role("button", name="Sign out").click()
    assert not [c for c in page.context.cookies() if "den_session" in c["name"]]
    assert goto(page, web.home + "tokens").status == 401  # the sign-in page
