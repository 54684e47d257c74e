"""The dashboard's admin pages in a real browser (Debian's Chromium through Playwright)
against the pool daemon's real Caddy: users, sessions, metric charts, the audit log's
filters and the UI allow-list, each through the registry's own methods."""

from __future__ import annotations

import contextlib
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from playwright.sync_api import Page

from den.cli.client import RpcError
from den.web.dash import charts
from tests.conftest import Daemon, ssh_key
from tests.ssh.conftest import person
from tests.storage.conftest import tar_dir
from tests.web.conftest import NewPage, Web, goto, login_link, sign_in
from tests.web.test_dashboard import png_not_blank
from tests.workspaces.conftest import Users, create, make_bb_rootfs

ADMIN_PAGES = [
    "admin", "admin/users", "admin/workspaces", "admin/sessions", "admin/images", "admin/jobs",
    "admin/audit", "admin/node", "admin/ui",
]  # fmt: skip


def admin_page(d: Daemon, web: Web, new_page: NewPage, users: Users) -> tuple[str, Page]:
    admin = users.make("admin")
    page = new_page()
    sign_in(page, web, login_link(d, admin))
    return admin, page


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not callable(check) or not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_admin_pages_are_404_for_members_and_send_strangers_to_sign_in(
    pool_daemon: Daemon, web: Web, users: Users, web_bb: str
) -> None:
    member, admin = users.make("member"), users.make("admin")
    create(pool_daemon, member, "app", image=web_bb)
    pages = [*ADMIN_PAGES, f"admin/users/{member}", f"admin/metrics/{member}/app"]
    member_cookie, admin_cookie = web.login_cookie(member), web.login_cookie(admin)
    for path in pages:
        # The status itself, not a hidden button: the same 404 as an unknown address.
        reply = web.curl(web.home + path, cookie=member_cookie)
        assert reply.status == 404, (path, reply.status)
        assert member not in reply.text and "Not found" in reply.text
        reply = web.curl(web.home + path)
        assert reply.status == 302 and "/_den/login?next=" in reply.header("location"), path
        reply = web.curl(web.home + path, cookie=admin_cookie)
        assert reply.status == 200, (path, reply.status, reply.text[:300])
    # Also on den's TCP listener.
    reply = web.curl(pool_daemon.http_url + "/admin/users", cookie=member_cookie)
    assert reply.status in (302, 404)  # its cookie is Caddy's domain's: a stranger there
    # A workspace or user that is not there: 404 for an admin too.
    for path in ("admin/metrics/nobody/nothing", "admin/metrics/Bad!/x", "admin/users/Bad!"):
        assert web.curl(web.home + path, cookie=admin_cookie).status == 404


def test_every_admin_page_renders_with_a_screenshot(
    pool_daemon: Daemon, web: Web, users: Users, new_page: NewPage, tmp_path: Path
) -> None:
    admin, page = admin_page(pool_daemon, web, new_page, users)
    for path in [*ADMIN_PAGES, f"admin/users/{admin}"]:
        resp = goto(page, web.home + path)
        assert resp.status == 200, (path, resp.status)
        assert page.locator("nav.admin").is_visible()
        shot = tmp_path / f"{path.replace('/', '_')}.png"
        page.screenshot(path=str(shot), full_page=True)
        png_not_blank(shot)
    goto(page, web.home + "admin")
    stats = pool_daemon.call("stats")
    assert page.inner_text("[data-stat=users]") == str(stats["users"])
    assert page.locator("meter").count() == 3


def test_admin_creates_edits_and_deletes_a_user(
    pool_daemon: Daemon, web: Web, users: Users, new_page: NewPage, tmp_path: Path
) -> None:
    d = pool_daemon
    _admin, page = admin_page(d, web, new_page, users)
    name = f"u{int(time.time() * 1000) % 10**8}"
    _key, pub = ssh_key(tmp_path, name)
    try:
        goto(page, web.home + "admin/users")
        page.get_by_label("Name").fill(name)
        page.get_by_label("Max workspaces").fill("3")
        page.get_by_label("Max memory (MiB)").fill("2048")
        page.get_by_label("First SSH key").fill(pub)
        with page.expect_navigation():
            page.get_by_role("button", name="Create user").click()
        assert page.url == web.home + "admin/users"
        assert f"user.create {name}: done" in page.inner_text(".flash.ok")
        assert page.locator(f"tr[data-user='{name}']").is_visible()
        made = d.call("user.get", name=name)
        assert (made["role"], made["max_workspaces"], made["max_memory_mb"], made["keys"]) == (
            "member", 3, 2048, 1,
        )  # fmt: skip

        # Its page: a role and a quota, then its key removed.
        page.locator(f"tr[data-user='{name}'] a", has_text="Edit").click()
        page.wait_for_url(web.home + f"admin/users/{name}")
        page.get_by_label("Role", exact=True).select_option("admin")
        page.get_by_label("Max CPUs").fill("2")
        with page.expect_navigation():
            page.get_by_role("button", name="Save").click()
        got = d.call("user.get", name=name)
        assert (got["role"], got["max_cpu"], got["max_workspaces"]) == ("admin", 2, 3)
        page.once("dialog", lambda dlg: dlg.accept())
        with page.expect_navigation():
            page.get_by_role("button", name="Remove").click()
        assert d.call("user.get", name=name)["keys"] == 0
        assert d.call("key.list", user=name) == []
        # A bad key: the registry's words, and nothing added.
        page.get_by_label("Public key").fill("ssh-ed25519 not-a-key")
        with page.expect_navigation():
            page.get_by_role("button", name="Add key").click()
        assert "Invalid params" in page.inner_text(".flash.error")
        assert d.call("key.list", user=name) == []

        page.once("dialog", lambda dlg: dlg.accept())
        with page.expect_navigation():
            page.get_by_role("button", name=f"Delete user {name}").click()
        assert page.url == web.home + "admin/users"
        assert page.locator(f"tr[data-user='{name}']").count() == 0
        try:
            d.call("user.get", name=name)
            raise AssertionError("the user is still there")
        except RpcError:
            pass
    finally:
        with contextlib.suppress(RpcError):
            d.call("user.delete", name=name)


def test_admin_kills_a_live_session_and_its_row_goes(
    pool_daemon: Daemon, web: Web, users: Users, web_bb: str, new_page: NewPage, tmp_path: Path
) -> None:
    d = pool_daemon
    p = person(d, users, tmp_path)
    create(d, p.name, "app", image=web_bb)
    proc = subprocess.Popen(
        ["ssh", *p.opts(), "app@127.0.0.1", "echo started; sleep 300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        (sess,) = d.call("session.list", user=p.name)
        _admin, page = admin_page(d, web, new_page, users)
        goto(page, web.home + "admin/sessions")
        row = page.locator(f"tr[data-kind=session][data-id='{sess['id']}']")
        assert row.is_visible() and f"{p.name}/app" in row.inner_text()
        page.wait_for_function("window.denEvents && window.denEvents.readyState === 1")
        page.evaluate("window.denMark = 'same page'")
        page.once("dialog", lambda dlg: dlg.accept())
        row.get_by_role("button", name="Kill").click()
        row.wait_for(state="detached", timeout=15_000)  # the live update took it away
        assert page.evaluate("window.denMark") == "same page"  # no reload
        proc.wait(10)  # the ssh client saw its session end
        assert all(s["id"] != sess["id"] for s in d.call("session.list"))
    finally:
        proc.kill()
        proc.wait()


def test_metrics_page_draws_svg_charts(
    pool_daemon: Daemon, web: Web, users: Users, web_bb: str, new_page: NewPage, tmp_path: Path
) -> None:
    d = pool_daemon
    owner = users.make("member")
    create(d, owner, "app", image=web_bb)
    ref = f"{owner}/app"
    wait_until(lambda: len(d.call("workspace.metrics", ref=ref)) >= 3, 30, "3 metric samples")
    _admin, page = admin_page(d, web, new_page, users)
    goto(page, web.home + f"admin/metrics/{ref}?window=15m")
    assert page.title() == f"Metrics of {ref} · den"
    charts_ = page.locator("svg.chart")
    assert charts_.count() == 3
    for chart_id in ("cpu", "memory"):
        line = page.locator(f"svg#{chart_id} polyline.series")
        assert line.count() == 1
        assert len(str(line.get_attribute("points")).split()) >= 2
    assert page.locator("svg#memory text.tick").count() >= 5  # axis labels
    assert "MiB" in str(page.text_content("svg#memory"))
    shot = tmp_path / "metrics.png"
    page.screenshot(path=str(shot), full_page=True)
    png_not_blank(shot)
    # Another window, from the page's own GET form.
    page.get_by_label("Window", exact=True).select_option("24h")
    with page.expect_navigation():
        page.get_by_role("button", name="Show").click()
    assert page.url.endswith(f"admin/metrics/{ref}?window=24h")
    # One point per 6 minutes over a day: this young workspace has one, a dot of memory;
    # CPU and network need two, and say so instead of failing.
    assert page.locator("figure.chart").count() == 3
    assert page.locator("svg#memory circle.series").count() == 1
    assert page.locator(".no-samples").count() == 2
    assert "no samples yet" in page.inner_text(".no-samples >> nth=0")


def test_charts_draw_lines_dots_and_no_samples() -> None:
    end = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    start = end - timedelta(minutes=15)
    empty = charts.line_chart("CPU", [charts.Series("x", [])], start, end, charts.cores, "c")
    assert "no samples yet" in empty and "<svg" not in empty
    one = charts.line_chart(
        "Mem <b>", [charts.Series("m", [(end, 5.0)])], start, end, charts.mib, "m"
    )
    assert "<circle" in one and "Mem &lt;b&gt;" in one and "<b>" not in one
    pts = [(start + timedelta(minutes=i), float(i)) for i in range(10)]
    two = charts.line_chart(
        "Net", [charts.Series("rx", pts), charts.Series("tx", pts)], start, end, charts.rate, "n"
    )
    assert two.count("<polyline") == 2 and "rx" in two and "tx" in two
    assert charts.nice_max(7.3) == 10 and charts.nice_max(0) == 1 and charts.nice_max(2.2) == 2.5
    assert charts.rate(2048) == "2 KiB/s"


def test_admin_imports_an_image_with_live_progress_and_deletes_it(
    pool_daemon: Daemon, web: Web, users: Users, new_page: NewPage, tmp_path: Path
) -> None:
    d = pool_daemon
    name = f"adm{int(time.time() * 1000) % 10**6}"
    tarball = tar_dir(make_bb_rootfs(tmp_path / "rootfs"), tmp_path / "bb.tar.zst")
    _admin, page = admin_page(d, web, new_page, users)
    try:
        goto(page, web.home + "admin/images")
        page.get_by_label("Name", exact=True).last.fill(name)
        page.get_by_label("Path on the host").fill(str(tarball))
        with page.expect_navigation():
            page.get_by_role("button", name="Import").click()
        assert page.url == web.home + "admin/images"
        job = page.locator("tr[data-kind=job]", has_text=f"image:{name}")
        assert job.count() == 1 and job.locator("progress").count() == 1
        # The job's state turns done on the open page (live), and the image is there.
        page.wait_for_function(
            "(t) => [...document.querySelectorAll('tr[data-kind=job]')].some((r) =>"
            " r.textContent.includes(t) &&"
            " r.querySelector('[data-field=state]').textContent.trim() === 'done')",
            arg=f"image:{name}",
            timeout=60_000,
        )
        assert [i["state"] for i in d.call("image.list") if i["name"] == name] == ["ready"]
        goto(page, web.home + "admin/images")
        page.once("dialog", lambda dlg: dlg.accept())
        with page.expect_navigation():
            page.locator(f"tr[data-image='{name}']").get_by_role("button", name="Delete").click()
        assert all(i["name"] != name for i in d.call("image.list"))
    finally:
        with contextlib.suppress(RpcError):
            d.call("image.delete", name=name)


def test_audit_filters_narrow_the_log(
    pool_daemon: Daemon, web: Web, users: Users, new_page: NewPage
) -> None:
    d = pool_daemon
    member = users.make("member")
    _admin, page = admin_page(d, web, new_page, users)
    goto(page, web.home + "admin/audit")
    everything = int(page.inner_text("#audit-count"))
    assert everything > 1
    page.get_by_label("Target").fill(f"user:{member}")
    page.get_by_label("Method").fill("user.create")
    with page.expect_navigation():
        page.get_by_role("button", name="Filter").click()
    assert page.url.startswith(web.home + "admin/audit?")
    assert int(page.inner_text("#audit-count")) == 1
    row = page.locator("tr[data-audit]")
    assert "user.create" in row.inner_text() and f"user:{member}" in row.inner_text()
    # The outcome filter: nothing of this user's failed.
    page.get_by_label("Outcome").select_option("not_found")
    with page.expect_navigation():
        page.get_by_role("button", name="Filter").click()
    assert int(page.inner_text("#audit-count")) == 0
    # A bad filter: the registry's words, not an error page.
    resp = goto(page, web.home + "admin/audit?since=yesterday-ish")
    assert resp.status == 200
    assert "since" in page.inner_text(".flash.error")


def test_ui_page_restricts_to_me_then_opens_access(
    pool_daemon: Daemon, web: Web, users: Users, new_page: NewPage
) -> None:
    d = pool_daemon
    _admin, page = admin_page(d, web, new_page, users)
    try:
        goto(page, web.home + "admin/ui")
        me = page.inner_text("#my-addr")
        assert me == "127.0.0.1", me  # the browser's address, as Caddy saw it
        page.once("dialog", lambda dlg: dlg.accept())
        with page.expect_navigation():
            page.get_by_role("button", name="Restrict to me").click()
        assert [e["network"] for e in d.call("ui.list")] == ["127.0.0.1/32"] or [
            e["network"] for e in d.call("ui.list")
        ] == ["127.0.0.1"]
        assert "Restricted" in page.inner_text("#ui-state")
        # Another address is refused now; this browser is not.
        reply = web.curl(web.home, "--interface", "127.0.0.2")
        assert reply.status == 403, reply.status
        page.once("dialog", lambda dlg: dlg.accept())
        with page.expect_navigation():
            page.get_by_role("button", name="Open access").click()
        assert d.call("ui.list") == []
        assert "Open" in page.inner_text("#ui-state")
        assert web.curl(web.home, "--interface", "127.0.0.2").status != 403
    finally:
        d.call("ui.open")  # the daemon is shared: never leave it restricted


def test_a_members_hostile_strings_are_text_on_the_admins_pages(
    pool_daemon: Daemon, web: Web, users: Users
) -> None:
    """What a member writes (display name, token description) and an admin reads: text,
    never markup, and no page allows an inline script (CSP)."""
    member, admin = users.make("member"), users.make("admin")
    x = '"><img src=x onerror=alert(1)><script>alert(2)</script>'
    assert "result" in pool_daemon.call_as(
        member, "user.update", {"name": member, "display_name": x}
    )
    assert "result" in pool_daemon.call_as(member, "token.create", {"description": x})
    admin_cookie, member_cookie = web.login_cookie(admin), web.login_cookie(member)
    for path, cookie in (("admin/users", admin_cookie), ("tokens", member_cookie)):
        reply = web.curl(web.home + path, cookie=cookie)
        assert reply.status == 200, (path, reply.status)
        assert "<img src=x" not in reply.text and "<script>alert" not in reply.text, path
        assert "&lt;img src=x onerror=alert(1)&gt;" in reply.text, path
        csp = reply.header("content-security-policy")
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
        assert "frame-ancestors 'none'" in csp and reply.header("cache-control") == "no-store"
