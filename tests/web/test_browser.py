"""Workspace URLs in a real browser: Debian's Chromium, headless, driven by Playwright.

Chromium trusts the test Caddy's internal root through an NSS database in a
home directory of its own (made with certutil, from libnss3-tools; without it
the browser is told to accept Caddy's certificate), resolves ``*.localhost`` to
loopback, and goes through den's real sign-in pages, share links, websockets,
server-sent events and wake-on-request.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page

from tests.conftest import Daemon
from tests.web.conftest import (
    CHROMIUM,
    NewPage,
    Web,
    goto,
    login_link,
    press_sign_in,
    reload,
    serve_files,
    sign_in,
    wait_listening,
)
from tests.workspaces.conftest import Users, create, detach, run

STREAM_SERVER = Path(__file__).parent / "data" / "stream_server.py"
APP_TEXT = "hello from den"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium")


@pytest.fixture
def site(pool_daemon: Daemon, users: Users, web_bb: str) -> tuple[str, str]:
    """(owner, workspace name) of a running workspace whose httpd serves APP_TEXT."""
    owner = users.make("member")
    create(pool_daemon, owner, "app", image=web_bb)
    serve_files(pool_daemon, f"{owner}/app", text=APP_TEXT)
    return owner, "app"


def on_sign_in_page(page: Page, web: Web) -> None:
    assert page.url.startswith(web.home + "_den/login"), page.url
    body = page.inner_text("body")
    assert "ssh -p" in body and "login" in body, body
    assert APP_TEXT not in body


def share(d: Daemon, owner: str, method: str, **params: Any) -> dict[str, Any]:
    res = d.call_as(owner, method, {"ref": "app", **params})
    assert "result" in res, res
    out: dict[str, Any] = res["result"]
    return out


# -- signing in ----------------------------------------------------------------------------


def test_stranger_on_a_private_url_lands_on_the_sign_in_page(
    web: Web, site: tuple[str, str], new_page: NewPage
) -> None:
    page = new_page()
    resp = goto(page, web.url(*site))
    assert resp.status == 401
    on_sign_in_page(page, web)
    assert "Sign in to den" in page.title()


def test_login_link_signs_in_once_and_returns_to_the_workspace(
    pool_daemon: Daemon, web: Web, site: tuple[str, str], new_page: NewPage
) -> None:
    url = web.url(*site, "/index.html")
    page = new_page()
    goto(page, url)
    on_sign_in_page(page, web)

    link = login_link(pool_daemon, site[0])
    press_sign_in(page, link, user=site[0])
    assert page.url == url, page.inner_text("body")  # where the visit started
    assert page.inner_text("body") == APP_TEXT
    # The session works for the next visit too, and den's cookie is not visible to scripts.
    resp = goto(page, web.url(*site))
    assert resp.status == 200
    assert page.evaluate("document.cookie") == ""

    # The same link in another browser: used up (its page says so, and has no button).
    other = new_page()
    resp = goto(other, link)
    assert resp.status == 401 and "Link not valid" in other.title(), other.content()
    resp = goto(other, url)
    assert resp.status == 401
    on_sign_in_page(other, web)


# -- sharing -------------------------------------------------------------------------------


def test_named_user_sees_it_and_another_member_does_not(
    pool_daemon: Daemon, web: Web, users: Users, site: tuple[str, str], new_page: NewPage
) -> None:
    owner, name = site
    friend, stranger = users.make("member"), users.make("member")
    share(pool_daemon, owner, "share.set", mode="users", add=[friend])
    url = web.url(owner, name)

    page = new_page()
    sign_in(page, web, login_link(pool_daemon, friend))
    resp = goto(page, url)
    assert resp.status == 200
    assert page.inner_text("body") == APP_TEXT

    page = new_page()
    sign_in(page, web, login_link(pool_daemon, stranger))
    resp = goto(page, url)
    # Not shared with you looks like nothing at all: nobody learns what exists.
    assert resp.status == 404
    assert "Not found" in page.title()
    body = page.inner_text("body")
    assert "you may open" in body and APP_TEXT not in body


def test_public_url_needs_no_sign_in(
    pool_daemon: Daemon, web: Web, site: tuple[str, str], new_page: NewPage
) -> None:
    owner, name = site
    share(pool_daemon, owner, "share.set", mode="public")
    page = new_page()
    url = web.url(owner, name)
    resp = goto(page, url)
    assert resp.status == 200
    assert page.url == url
    assert page.inner_text("body") == APP_TEXT


def test_secret_link_works_until_revoked(
    pool_daemon: Daemon, web: Web, site: tuple[str, str], new_page: NewPage
) -> None:
    owner, name = site
    link = share(pool_daemon, owner, "share.link", note="browser test")
    url = web.url(owner, name)
    assert link["url"].startswith(url + "?den_share=")

    page = new_page()
    resp = goto(page, link["url"])
    assert resp.status == 200
    assert page.url == url  # the secret left the address bar
    assert page.inner_text("body") == APP_TEXT
    reload(page)
    assert page.inner_text("body") == APP_TEXT

    share(pool_daemon, owner, "share.unlink", id=link["id"])
    reload(page)
    on_sign_in_page(page, web)
    resp = goto(page, link["url"])
    assert resp.status == 403
    assert "Link not valid" in page.title()


# -- streams -------------------------------------------------------------------------------

WEBSOCKET_JS = """
() => new Promise((resolve, reject) => {
  const ws = new WebSocket("wss://" + location.host + "/ws");
  const sent = ["one", "two", "x".repeat(70000)];
  const got = [];
  ws.onopen = () => ws.send(sent[0]);
  ws.onmessage = (e) => {
    got.push(e.data.length > 100 ? "long:" + e.data.length : e.data);
    // The next message goes only once the previous echo came back.
    if (got.length < sent.length) ws.send(sent[got.length]);
    else { ws.close(); resolve(got); }
  };
  ws.onerror = () => reject(new Error("websocket error after " + JSON.stringify(got)));
  setTimeout(() => reject(new Error("websocket timeout after " + JSON.stringify(got))), 20000);
})
"""

SSE_JS = """
(count) => new Promise((resolve, reject) => {
  const es = new EventSource("/events");
  const t0 = performance.now();
  const got = [];
  es.onmessage = (e) => {
    got.push([e.data, performance.now() - t0]);
    if (got.length === count) { es.close(); resolve(got); }
  };
  es.onerror = () => { es.close(); reject(new Error("event stream error after " + got.length)); };
  setTimeout(() => { es.close(); reject(new Error("event stream timeout: " + got.length)); }, 20000);
})
"""


def test_websockets_and_server_sent_events_stream(
    pool_daemon: Daemon, web: Web, users: Users, web_dev: str, new_page: NewPage
) -> None:
    owner = users.make("member")
    create(pool_daemon, owner, "app", image=web_dev)
    ref = f"{owner}/app"
    res = run(
        pool_daemon, ref, "sh", "-c", "cat > /tmp/stream_server.py",
        stdin=STREAM_SERVER.read_text(),
    )  # fmt: skip
    assert res["exit_code"] == 0, res
    detach(pool_daemon, ref, "exec python3 /tmp/stream_server.py")
    wait_listening(pool_daemon, ref, 8080)

    page = new_page()
    sign_in(page, web, login_link(pool_daemon, owner))
    resp = goto(page, web.url(owner, "app"))
    assert resp.status == 200
    assert "stream server" in page.inner_text("body")

    assert page.evaluate(WEBSOCKET_JS) == ["echo: one", "echo: two", "long:70006"]

    count = 20  # the server sends 20 events 100 ms apart: about 2 s in all
    events = page.evaluate(SSE_JS, count)
    assert [e[0] for e in events] == [f"tick {i}" for i in range(count)]
    times = [float(e[1]) for e in events]  # ms since the page opened the stream
    # Streamed, not buffered: the first event came long before the last one was sent,
    # and the events arrived spread over the stream's life, not in one burst.
    assert times[-1] - times[0] > 1200, times
    spaced = sum(1 for a, b in itertools.pairwise(times) if b - a > 40)
    assert spaced >= count // 2, times


# -- wake on request -----------------------------------------------------------------------


def test_suspended_workspace_wakes_for_a_browser_visit(
    pool_daemon: Daemon, web: Web, site: tuple[str, str], new_page: NewPage
) -> None:
    owner, name = site
    ref = f"{owner}/{name}"
    page = new_page()
    sign_in(page, web, login_link(pool_daemon, owner))

    pool_daemon.call("workspace.suspend", ref=ref)
    assert pool_daemon.call("workspace.get", ref=ref)["state"] == "suspended"
    resp = goto(page, web.url(owner, name))
    assert resp.status == 200
    assert page.inner_text("body") == APP_TEXT
    assert pool_daemon.call("workspace.get", ref=ref)["state"] == "running"
