"""Workspace URLs through the real Caddy den runs: curl (trusting Caddy's internal
root) and, in the browser tests, Debian's Chromium driven by Playwright.

``*.localhost`` names resolve to loopback in curl and Chromium with no DNS.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bench._browser import CHROMIUM, chromium  # one copy: the benchmarks' Chromium too
from playwright.sync_api import Browser, BrowserContext, Page, Response

from den.cli.client import RpcError
from den.web.labels import label
from tests.conftest import Daemon
from tests.workspaces.conftest import Users, import_bb, make_users
from tests.workspaces.escape.conftest import dev_image_as

DOMAIN = "den.localhost"
WEB_BB = "webbb"
WEB_DEV = "dev"
NewPage = Callable[[], Page]


@dataclass
class Reply:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str:
        return ", ".join(self.headers.get(name.lower(), []))

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class Web:
    """The pool daemon's web front door, as an outside client sees it."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        state = json.loads((d.data_dir / "serve.json").read_text())
        self.port = int(state["https_port"])
        self.home = state["https"]
        self.ca = d.data_dir / "caddy" / "data" / "pki" / "authorities" / "local" / "root.crt"

    def host(self, owner: str, name: str, port: int | None = None) -> str:
        return f"{label(owner, name, port)}.{DOMAIN}"

    def url(self, owner: str, name: str, path: str = "/", port: int | None = None) -> str:
        return f"https://{self.host(owner, name, port)}:{self.port}{path}"

    def curl(
        self,
        url: str,
        *args: str,
        headers: dict[str, str] | None = None,
        cookie: str | None = None,
        timeout: float = 30,
    ) -> Reply:
        """One request with the real curl (no redirects followed); the reply as it came."""
        argv = ["curl", "-sS", "--cacert", str(self.ca), "-D", "-", "-o", "-", "-m", str(timeout)]
        for k, v in (headers or {}).items():
            argv += ["-H", f"{k}: {v}"]
        if cookie is not None:
            argv += ["-H", f"Cookie: {cookie}"]
        res = subprocess.run(
            [*argv, *args, url], capture_output=True, timeout=timeout + 10, check=False
        )
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        return parse_reply(res.stdout)

    def login_cookie(self, user: str) -> str:
        """Sign in as ``user`` the way a browser does: a one-time link, then its form.
        The Cookie header such a browser sends den's domain: ``den_session`` (for the
        domain: workspace URLs read it) and ``__Host-den_session`` (den's own pages
        read only this one) with the same value."""
        res = self.d.call_as(user, "login.link")
        assert "result" in res, res
        link = res["result"]["url"]
        t = link.split("t=", 1)[1]
        reply = self.curl(
            self.home + "_den/login",
            "--data-urlencode",
            f"t={t}",
            headers={"Origin": self.home.rstrip("/")},
        )
        assert reply.status == 303, reply.text
        jar = {c.split("=", 1)[0]: c.split(";", 1)[0] for c in reply.headers.get("set-cookie", [])}
        assert {"den_session", "__Host-den_session"} <= jar.keys(), reply.headers
        return f"{jar['den_session']}; {jar['__Host-den_session']}"


def parse_reply(raw: bytes) -> Reply:
    """curl -D - output: the last header block (after 1xx ones), then the body."""
    rest = raw
    while True:
        head, sep, body = rest.partition(b"\r\n\r\n")
        assert sep, raw[:500]
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if status >= 200 or not body.startswith(b"HTTP/"):
            break
        rest = body
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return Reply(status, headers, body)


@pytest.fixture
def users(pool_daemon: Daemon) -> Iterator[Users]:
    """den users a test makes on the pool daemon; deleted (with their workspaces) after."""
    with make_users(pool_daemon) as u:
        yield u


@pytest.fixture(scope="session")
def web(pool_daemon: Daemon) -> Web:
    return Web(pool_daemon)


@pytest.fixture(scope="session")
def web_bb(pool_daemon: Daemon) -> Iterator[str]:
    """A busybox image (its httpd serves files) for the web tests."""
    import_bb(pool_daemon, WEB_BB)
    try:
        yield WEB_BB
    finally:
        with contextlib.suppress(RpcError):
            pool_daemon.call("image.delete", name=WEB_BB)


@pytest.fixture(scope="session")
def web_dev(pool_daemon: Daemon) -> str:
    """The dev image (python3 inside) for servers that stream."""
    return dev_image_as(pool_daemon, WEB_DEV)


def serve_files(d: Daemon, ref: str, port: int = 8080, text: str = "hello from den") -> None:
    """busybox httpd in the workspace, serving ``text`` at / on every address."""
    from tests.workspaces.conftest import detach, ok

    ok(d, ref, f"mkdir -p /srv/www && printf '%s' '{text}' > /srv/www/index.html")
    detach(d, ref, f"exec busybox httpd -f -p 0.0.0.0:{port} -h /srv/www")
    wait_listening(d, ref, port)


def wait_listening(d: Daemon, ref: str, port: int, timeout: float = 20) -> None:
    from tests.workspaces.conftest import sh

    probe = f"http://127.0.0.1:{port}/"
    script = (
        f"i=0; while [ $i -lt {int(timeout * 10)} ]; do "
        f"wget -q -O /dev/null {probe} 2>/dev/null && exit 0; "
        f"curl -s -o /dev/null {probe} 2>/dev/null && exit 0; "
        "i=$((i+1)); sleep 0.1; done; exit 1"
    )
    res = sh(d, ref, script)
    assert res["exit_code"] == 0, f"nothing listens on {port} in {ref}: {res}"


def caddy_pid(d: Daemon) -> int:
    return int((d.data_dir / "caddy.pid").read_text())


def read_ca(web: Web) -> Path:
    assert web.ca.is_file(), "Caddy's internal root certificate is missing"
    return web.ca


class _Db:
    """What the gate's functions use of an App: the daemon's database, one generation."""

    web_generation = 0

    def __init__(self, d: Daemon) -> None:
        from den.db.engine import make_engine, sessionmaker

        self.engine = make_engine(f"sqlite+aiosqlite:///{d.data_dir / 'den.db'}")
        self.sessions = sessionmaker(self.engine)


def call_gate(d: Daemon, module: Any, fn: str, *args: str) -> Any:
    """Call one of the plain functions the gate uses (``module.fn(app, *args)``) on the
    daemon's own database, from the test process."""
    import asyncio

    async def run() -> Any:
        db = _Db(d)
        try:
            return await getattr(module, fn)(db, *args)
        finally:
            await db.engine.dispose()

    return asyncio.run(run())


# -- the browser (Debian's Chromium, headless, through Playwright) ----------------------------


@pytest.fixture(scope="module")
def browser(web: Web) -> Iterator[Browser]:
    """A headless Chromium for a test module; every test opens contexts of its own.

    Not one for the whole session: Playwright's synchronous API keeps an event loop
    running in the main thread while it is started, and every later test calling
    ``asyncio.run()`` there would fail.

    Chromium drops connections it is opening whenever the host's addresses change
    (ERR_NETWORK_CHANGED), and every workspace den starts adds a veth pair on the
    host. So it runs in a network namespace of its own, whose 127.0.0.1 relays
    Caddy's port and den's TCP listener (its dashboard) at the same ports.
    """
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium")
    http_port = int(web.d.http_url.rsplit(":", 1)[1])
    with chromium(web.ca, web.port, http_port, name="denbrowser") as b:
        yield b


@pytest.fixture
def contexts(browser: Browser) -> Iterator[list[BrowserContext]]:
    """Browser contexts a test opens (a fresh profile each: no cookies); closed after."""
    opened: list[BrowserContext] = []
    try:
        yield opened
    finally:
        for c in opened:
            c.close()


@pytest.fixture
def new_page(browser: Browser, contexts: list[BrowserContext]) -> NewPage:
    """``new_page()``: a page in a browser context of its own."""

    def make() -> Page:
        # No certificate error is ignored: Chromium trusts Caddy's root (above).
        ctx = browser.new_context()
        ctx.set_default_timeout(30_000)
        contexts.append(ctx)
        return ctx.new_page()

    return make


def goto(page: Page, url: str) -> Response:
    resp = page.goto(url)
    assert resp is not None
    return resp


def reload(page: Page) -> Response:
    resp = page.reload()
    assert resp is not None
    return resp


def press_sign_in(page: Page, link: str, user: str | None = None) -> None:
    """Open a one-time link and press its button, as a person does."""
    goto(page, link)
    if user is not None:
        assert f"Sign this browser in to den as {user}?" in page.inner_text("body")
    with page.expect_navigation():
        page.get_by_role("button", name="Sign in").click()


def login_link(d: Daemon, user: str) -> str:
    res = d.call_as(user, "login.link")
    assert "result" in res, res
    url: str = res["result"]["url"]
    return url


def sign_in(page: Page, web: Web, link: str) -> None:
    press_sign_in(page, link)
    assert page.url == web.home, page.url
    assert "Signed in as" in page.inner_text("body")
