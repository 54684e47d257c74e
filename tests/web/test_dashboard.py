"""The web dashboard in a real browser (Debian's Chromium, headless, through Playwright)
against the pool daemon's real Caddy and its TCP listener."""

from __future__ import annotations

import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from playwright.sync_api import Page

from den.services import load_all
from tests.conftest import Daemon
from tests.web.conftest import NewPage, Web, goto, login_link, sign_in
from tests.workspaces.conftest import Users

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
