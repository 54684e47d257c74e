"""The terminal in the browser (den.web.term), in Debian's Chromium through Caddy:
xterm.js over den's websocket into a login shell in a busybox workspace.

One workspace for the module; the shell's screen is read from xterm's own buffer.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page

from tests.conftest import Daemon
from tests.web.conftest import CHROMIUM, NewPage, Web, goto, login_link, sign_in
from tests.workspaces.conftest import create, make_users

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium")

SCREEN = """() => {
  const b = window.denTerminal.buffer.active;
  let text = "";
  for (let i = 0; i < b.length; i++) text += b.getLine(i).translateToString(true) + "\\n";
  return text;
}"""


@pytest.fixture(scope="module")
def box(pool_daemon: Daemon, web_bb: str) -> Iterator[tuple[str, str, str]]:
    """(owner, admin, OWNER/NAME of the owner's busybox workspace)."""
    with make_users(pool_daemon) as users:
        owner, admin = users.make("member"), users.make("admin")
        create(pool_daemon, owner, "term", image=web_bb)
        yield owner, admin, f"{owner}/term"


def open_terminal(page: Page, web: Web, d: Daemon, user: str, ref: str) -> str:
    """Sign ``page`` in as ``user``, open the terminal of ``ref``; its session id."""
    sign_in(page, web, login_link(d, user))
    resp = goto(page, web.home + "terminal/" + ref)
    assert resp.status == 200, resp.status
    return attached(page)


def attached(page: Page) -> str:
    page.wait_for_selector("#terminal[data-state=attached]")
    sid = page.get_attribute("#terminal", "data-session")
    assert sid
    return sid


def screen(page: Page) -> str:
    return str(page.evaluate(SCREEN))


def wait_screen(page: Page, pattern: str) -> re.Match[str]:
    """Wait until the terminal shows a line matching ``pattern``; the match."""
    page.wait_for_function(
        f"(p) => new RegExp(p, 'm').test(({SCREEN})())", arg=pattern, timeout=30_000
    )
    m = re.search(pattern, screen(page), re.M)
    assert m is not None
    return m


def run_line(page: Page, line: str) -> None:
    page.locator("#terminal").click()
    page.keyboard.type(line)
    page.keyboard.press("Enter")


def web_sessions(d: Daemon, ref: str) -> list[dict[str, Any]]:
    return [s for s in d.call("session.list") if s["kind"] == "web" and s["workspace"] == ref]


def test_terminal_runs_resizes_reattaches_and_wakes(
    pool_daemon: Daemon, web: Web, box: tuple[str, str, str], new_page: NewPage
) -> None:
    owner, _admin, ref = box
    pool_daemon.call("workspace.suspend", ref=ref)
    page = new_page()
    sid = open_terminal(page, web, pool_daemon, owner, ref)
    # Opening the terminal resumed the workspace.
    assert pool_daemon.call("workspace.get", ref=ref)["state"] == "running"

    run_line(page, "echo hello-$((6*7))")
    wait_screen(page, r"^hello-42$")
    [s] = web_sessions(pool_daemon, ref)
    assert s["id"] == sid and s["user"] == owner
    assert s["bytes_in"] > 0 and s["bytes_out"] > 0 and s["client"]

    # A smaller window: xterm fits itself, den resizes the terminal.
    before = page.evaluate("() => [window.denTerminal.cols, window.denTerminal.rows]")
    page.set_viewport_size({"width": 640, "height": 480})
    page.wait_for_function(
        "(b) => window.denTerminal.cols !== b[0] || window.denTerminal.rows !== b[1]", arg=before
    )
    cols, rows = page.evaluate("() => [window.denTerminal.cols, window.denTerminal.rows]")
    run_line(page, "echo size=$(stty size)")
    wait_screen(page, rf"^size={rows} {cols}$")

    run_line(page, "X=kept-$((2*21)); echo pid-$$")
    pid = wait_screen(page, r"^pid-(\d+)$").group(1)

    # The page goes away and comes back: the same shell, its output replayed.
    page.reload()
    assert attached(page) == sid
    wait_screen(page, r"^hello-42$")
    run_line(page, "echo got-$X-$$")
    wait_screen(page, rf"^got-kept-42-{pid}$")
    assert [x["id"] for x in web_sessions(pool_daemon, ref)] == [sid]

    # A keystroke into the frozen workspace thaws it.
    pool_daemon.call("workspace.suspend", ref=ref)
    run_line(page, "echo awake-$((3*3))")
    wait_screen(page, r"^awake-9$")
    assert pool_daemon.call("workspace.get", ref=ref)["state"] == "running"

    # The shell ends: the page says so, and den forgets the session.
    run_line(page, "exit 3")
    page.wait_for_selector("#terminal[data-state=ended]")
    assert "status 3" in page.inner_text("#term-status")
    assert not web_sessions(pool_daemon, ref)


def test_admin_kills_a_browser_terminal(
    pool_daemon: Daemon, web: Web, box: tuple[str, str, str], new_page: NewPage
) -> None:
    owner, admin, ref = box
    page = new_page()
    sid = open_terminal(page, web, pool_daemon, owner, ref)
    run_line(page, "echo up-$((1+1))")
    wait_screen(page, r"^up-2$")

    res = pool_daemon.call_as(admin, "session.kill", {"id": sid})
    assert res.get("result") == {"killed": [sid]}, res
    page.wait_for_selector("#terminal[data-state=ended]")
    assert "The shell ended" in page.inner_text("#term-status")
    assert sid not in [s["id"] for s in pool_daemon.call("session.list")]
    # Opening it was a login into the workspace, in the audit log as ssh's are.
    events = pool_daemon.call("audit.list", target=f"workspace:{ref}", actor=owner)
    assert sid in [e["params"].get("session") for e in events if e["method"] == "web.terminal"]


def test_signing_out_ends_the_terminal(
    pool_daemon: Daemon, web: Web, box: tuple[str, str, str], new_page: NewPage
) -> None:
    owner, _admin, ref = box
    page = new_page()
    sid = open_terminal(page, web, pool_daemon, owner, ref)
    res = pool_daemon.call_as(owner, "login.revoke", {"all": True})  # `den logout --all`
    assert "result" in res, res
    # The open websocket re-checks its browser session (every 5 s): closed, shell ended.
    page.wait_for_selector("#terminal[data-state=ended]", timeout=15_000)
    assert "signed out" in page.inner_text("#term-status")
    page.wait_for_function("() => !sessionStorage.length")  # nothing left to re-attach to
    deadline = time.monotonic() + 10
    while sid in [s["id"] for s in pool_daemon.call("session.list")]:
        assert time.monotonic() < deadline, "the shell outlived its revoked browser session"
        time.sleep(0.1)


def upgrade(web: Web, path: str, cookie: str, origin: str) -> int:
    """The status den answers a websocket upgrade with (curl, as any client can send it)."""
    argv = [
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--http1.1", "-m", "5",
        "--cacert", str(web.ca), "-H", f"Cookie: {cookie}", "-H", f"Origin: {origin}",
        "-H", "Connection: Upgrade", "-H", "Upgrade: websocket",
        "-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        web.home.rstrip("/") + path,
    ]  # fmt: skip
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    return int(res.stdout[-3:])


def test_cross_site_websocket_and_strangers_are_refused(
    pool_daemon: Daemon, web: Web, box: tuple[str, str, str]
) -> None:
    owner, _admin, ref = box
    cookie = web.login_cookie(owner)
    home = web.home.rstrip("/")
    evil = web.url(owner, "term").rsplit("/", 1)[0]  # a workspace's own origin is another site's
    for origin in ("https://evil.example", evil):
        assert upgrade(web, f"/_den/term/{ref}", cookie, origin) == 403
    assert not web_sessions(pool_daemon, ref)
    # The same request from den's own origin is taken (curl then waits: no frames come).
    assert upgrade(web, f"/_den/term/{ref}", cookie, home) == 101
    for s in web_sessions(pool_daemon, ref):  # its shell would wait out the grace
        pool_daemon.call("session.kill", id=s["id"])

    with make_users(pool_daemon) as users:
        other = users.make("member")
        stranger = web.login_cookie(other)
        for path in (f"/terminal/{ref}", f"/_den/term/{ref}"):
            assert upgrade(web, path, stranger, home) == 404
        assert web.curl(home + f"/terminal/{owner}/nothing", cookie=cookie).status == 404


def test_reattaching_from_a_page_that_stopped_reading_keeps_the_output_flowing(
    pool_daemon: Daemon, box: tuple[str, str, str]
) -> None:
    """A page too slow for the shell's output pauses the shell; another page taking the
    terminal over gets it going again (it was left paused for good)."""
    import asyncio
    import concurrent.futures

    import aiohttp

    owner, _admin, ref = box
    base = pool_daemon.http_url
    t = login_link(pool_daemon, owner).split("t=", 1)[1]

    def bytes_out(sid: str) -> int:
        return int(next(s["bytes_out"] for s in web_sessions(pool_daemon, ref) if s["id"] == sid))

    async def paused(sid: str) -> int:
        """Once den stopped reading the shell's output: how much it had read."""
        before = -1
        async with asyncio.timeout(60):
            while True:
                now = await asyncio.to_thread(bytes_out, sid)
                if now == before:
                    return now
                before = now
                await asyncio.sleep(1.5)

    async def run() -> None:
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(base, cookie_jar=jar) as http:
            async with http.post(
                "/_den/login", data={"t": t}, headers={"Origin": base}, allow_redirects=False
            ) as r:
                assert r.status == 303, await r.text()
            path, origin = f"/_den/term/{ref}", {"Origin": base}
            slow = await http.ws_connect(path, headers=origin)
            hello = await slow.receive_json()
            sid = hello["id"]
            try:
                # Endless output this page reads none of: den pauses the shell.
                await slow.send_bytes(b"yes\n")
                stalled = await paused(sid)
                fast = await http.ws_connect(
                    f"{path}?attach={sid}&key={hello['key']}", headers=origin
                )
                assert (await fast.receive_json())["resumed"] is True
                got = 0
                async with asyncio.timeout(30):
                    while got < 4 * 65536:  # more than the replayed tail
                        msg = await fast.receive()
                        assert msg.type == aiohttp.WSMsgType.BINARY, msg
                        got += len(msg.data)
                assert await asyncio.to_thread(bytes_out, sid) > stalled
                await fast.close()
            finally:
                await slow.close()
                await asyncio.to_thread(pool_daemon.call, "session.kill", id=sid)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, run()).result()
