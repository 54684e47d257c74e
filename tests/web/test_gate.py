"""The gate through the real Caddy: who gets in, what the app is told, what is refused.

Each test makes its own users and a busybox workspace whose httpd serves a
page and a CGI script that prints the request's environment (the headers the
app receives).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Daemon, ssh_key
from tests.web.conftest import Web, serve_files
from tests.workspaces.conftest import Users, create, ok

# /cgi-bin/env prints the request's environment (the headers the app got) and
# counts every request that reached the app in /tmp/hits.
CGI = (
    "mkdir -p /srv/www/cgi-bin && printf '%s\\n' '#!/bin/sh' 'echo hit >> /tmp/hits' "
    "'printf \"Content-Type: text/plain\\r\\n\\r\\n\"' 'env' > /srv/www/cgi-bin/env "
    "&& chmod +x /srv/www/cgi-bin/env"
)


@pytest.fixture
def site(pool_daemon: Daemon, users: Users, web_bb: str) -> tuple[str, str]:
    """(owner, workspace name) of a running workspace serving files and the env CGI."""
    owner = users.make("member")
    create(pool_daemon, owner, "app", image=web_bb)
    ref = f"{owner}/app"
    ok(pool_daemon, ref, CGI)
    serve_files(pool_daemon, ref)
    return owner, "app"


def cgi_env(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


def test_stranger_is_sent_to_sign_in_and_owner_sees_the_app(
    web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    url = web.url(owner, name)
    r = web.curl(url)
    assert r.status == 302
    assert r.header("location").startswith(web.home + "_den/login?next=")
    assert "hello from den" not in r.text

    cookie = web.login_cookie(owner)
    r = web.curl(url, cookie=cookie)
    assert r.status == 200, r.text
    assert r.text == "hello from den"


def test_identity_headers_reach_the_app_and_spoofed_ones_do_not(
    web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    cookie = web.login_cookie(owner)
    r = web.curl(
        web.url(owner, name, "/cgi-bin/env"),
        cookie=cookie + "; theirs=1",
        headers={"X-Den-User": "mallory", "X-Den-Share": "public", "X-Den-Upstream": "1.2.3.4:1"},
    )
    assert r.status == 200, r.text
    env = cgi_env(r.text)
    assert env.get("HTTP_X_DEN_USER") == owner
    assert env.get("HTTP_X_DEN_SHARE") == "owner"
    assert "HTTP_X_DEN_UPSTREAM" not in env
    # den's own cookie never reaches the app; the app's own cookies do.
    assert env.get("HTTP_COOKIE") == "theirs=1"


def test_unknown_hosts_tell_nothing_of_which_workspaces_exist(
    web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    cookie = web.login_cookie(owner)
    for host in (f"nope--{owner}.den.localhost", "zz.den.localhost", "0--abcdef.den.localhost"):
        # Signed in: den's plain 404 page, never Caddy's.
        r = web.curl(f"https://{host}:{web.port}/", cookie=cookie)
        assert r.status == 404
        assert "There is nothing at this address that you may open." in r.text
        assert "caddy" not in r.text.lower()
        # A stranger is sent to sign in, exactly as for a private workspace that exists.
        r = web.curl(f"https://{host}:{web.port}/")
        assert r.status == 302 and r.header("location").startswith(web.home + "_den/login?")
        # A made-up share link, or another site's request: the same page as for one that exists.
        r = web.curl(f"https://{host}:{web.port}/?den_share=ab_cd")
        assert r.status == 403 and "Link not valid" in r.text
        r = web.curl(
            f"https://{host}:{web.port}/", headers={"Origin": "https://x.test"}, cookie="den_x=1"
        )
        assert r.status == 403 and "another site" in r.text
    assert web.curl(web.url(owner, name)).status == 302
    assert web.curl(web.url(owner, name, "/?den_share=ab_cd")).status == 403
    r = web.curl(web.url(owner, name), headers={"Origin": "https://x.test"}, cookie="den_x=1")
    assert r.status == 403


def hits(d: Daemon, ref: str) -> int:
    return int(ok(d, ref, "cat /tmp/hits 2>/dev/null | wc -l").strip())


def test_named_users_admins_public_and_strangers(
    pool_daemon: Daemon, web: Web, users: Users, site: tuple[str, str]
) -> None:
    owner, name = site
    ref = f"{owner}/{name}"
    friend, other = users.make(), users.make()
    admin = users.make("admin")
    page = web.url(owner, name, "/cgi-bin/env")
    friend_c, other_c, admin_c = (web.login_cookie(u) for u in (friend, other, admin))

    # Private: the owner and admins only.
    # Not shared with you looks exactly like nothing at all.
    r = web.curl(page, cookie=friend_c)
    assert r.status == 404 and "that you may open" in r.text
    r = web.curl(page, cookie=admin_c)
    assert r.status == 200 and cgi_env(r.text)["HTTP_X_DEN_SHARE"] == "admin"

    pool_daemon.call("share.set", ref=ref, add=[friend])
    r = web.curl(page, cookie=friend_c)
    assert r.status == 200, r.text
    env = cgi_env(r.text)
    assert (env["HTTP_X_DEN_USER"], env["HTTP_X_DEN_SHARE"]) == (friend, "user")
    assert web.curl(page, cookie=other_c).status == 404
    assert web.curl(page).status == 302

    pool_daemon.call("share.set", ref=ref, mode="public")
    r = web.curl(page)
    assert r.status == 200
    env = cgi_env(r.text)
    assert env["HTTP_X_DEN_SHARE"] == "public" and "HTTP_X_DEN_USER" not in env
    # A public page does not learn which den user opened it.
    env = cgi_env(web.curl(page, cookie=other_c).text)
    assert env["HTTP_X_DEN_SHARE"] == "public" and "HTTP_X_DEN_USER" not in env

    # Back to private: at once, for everyone.
    pool_daemon.call("share.set", ref=ref, mode="private")
    assert web.curl(page).status == 302
    assert web.curl(page, cookie=friend_c).status == 404


def test_secret_link_sets_a_cookie_and_stops_when_revoked(
    pool_daemon: Daemon, web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    ref = f"{owner}/{name}"
    link = pool_daemon.call("share.link", ref=ref, note="for a reviewer")
    secret_url = link["url"]
    assert secret_url.startswith(web.url(owner, name, "/")) and "den_share=" in secret_url
    wrong = secret_url[:-4] + "AAAA"
    assert web.curl(wrong).status == 403

    r = web.curl(secret_url.replace("/?", "/cgi-bin/env?x=1&"))
    assert r.status == 302
    # The secret leaves the address for a cookie of this host alone.
    assert r.header("location") == "/cgi-bin/env?x=1"
    cookie = r.headers["set-cookie"][0]
    assert cookie.startswith("__Host-den_share=") and "Domain" not in cookie
    assert "HttpOnly" in cookie and "Secure" in cookie
    jar = cookie.split(";", 1)[0]
    r = web.curl(web.url(owner, name, "/cgi-bin/env"), cookie=jar)
    assert r.status == 200
    env = cgi_env(r.text)
    assert env["HTTP_X_DEN_SHARE"] == "link" and "HTTP_COOKIE" not in env

    pool_daemon.call("share.unlink", ref=ref, id=link["id"])
    r = web.curl(web.url(owner, name, "/cgi-bin/env"), cookie=jar)
    assert r.status == 302
    assert web.curl(secret_url).status == 403


def test_bearer_tokens_work_and_never_reach_the_app(
    pool_daemon: Daemon, web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    token = pool_daemon.call("token.create", user=owner, right="write")
    page = web.url(owner, name, "/cgi-bin/env")
    r = web.curl(page, headers={"Authorization": f"Bearer {token['token']}"})
    assert r.status == 200, r.text
    env = cgi_env(r.text)
    assert env["HTTP_X_DEN_USER"] == owner and "HTTP_AUTHORIZATION" not in env
    r = web.curl(page, headers={"Authorization": "Bearer den_nope_nope"})
    assert r.status == 401 and r.header("www-authenticate") == "Bearer"
    # A read-only token reads den's API; it does not act in apps.
    read = pool_daemon.call("token.create", user=owner, right="read")
    assert web.curl(page, headers={"Authorization": f"Bearer {read['token']}"}).status == 404
    pool_daemon.call("token.revoke", id=token["id"])
    r = web.curl(page, headers={"Authorization": f"Bearer {token['token']}"})
    assert r.status == 401


def test_hostile_requests_never_reach_the_workspace(
    pool_daemon: Daemon, web: Web, users: Users, site: tuple[str, str]
) -> None:
    owner, name = site
    ref = f"{owner}/{name}"
    pool_daemon.call("share.set", ref=ref, mode="public")
    # A private workspace of someone else, to aim at by Host while SNI names the public one.
    other = users.make()
    create(pool_daemon, other, "secret", image="webbb")
    ok(pool_daemon, f"{other}/secret", CGI)
    serve_files(pool_daemon, f"{other}/secret")
    before = hits(pool_daemon, ref) + hits(pool_daemon, f"{other}/secret")
    public = web.url(owner, name, "/cgi-bin/env")
    for path in ("/../cgi-bin/env", "/cgi-bin/%2e%2e/cgi-bin/env", "/x/..%2fcgi-bin/env", "/..;/x"):
        r = web.curl(web.url(owner, name, path), "--path-as-is")
        assert r.status == 400, (path, r.status)
    # Over Caddy's header limit (HTTP/2 resets such a stream; HTTP/1.1 answers 431).
    r = web.curl(public, "--http1.1", headers={"X-Big": "a" * 70_000})
    assert r.status == 431
    r = web.curl(
        public,
        "--resolve",
        f"{web.host(owner, name)}:{web.port}:127.0.0.1",
        headers={"Host": f"{web.host(other, 'secret')}:{web.port}"},
    )
    assert r.status == 302, r.text  # the Host decides, and that one is private
    assert (
        web.curl(web.url(other, "secret", "/cgi-bin/env"), cookie=web.login_cookie(owner)).status
        == 404
    )
    after = hits(pool_daemon, ref) + hits(pool_daemon, f"{other}/secret")
    assert after == before


def test_nothing_listening_gets_den_502_page(
    pool_daemon: Daemon, web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    ref = f"{owner}/{name}"
    pool_daemon.call("web.port", ref=ref, port=8099)
    r = web.curl(web.url(owner, name), cookie=web.login_cookie(owner))
    assert r.status == 502
    assert "does not answer on port 8099" in r.text
    pool_daemon.call("web.publish", ref=ref, port=8080)
    r = web.curl(web.url(owner, name, port=8080), cookie=web.login_cookie(owner))
    assert r.status == 200 and r.text == "hello from den"


def test_suspended_workspace_wakes_on_request_and_visits_are_sessions(
    pool_daemon: Daemon, web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    ref = f"{owner}/{name}"
    cookie = web.login_cookie(owner)
    pool_daemon.call("workspace.suspend", ref=ref)
    assert pool_daemon.call("workspace.get", ref=ref)["state"] == "suspended"
    r = web.curl(web.url(owner, name), cookie=cookie)
    assert r.status == 200 and r.text == "hello from den"
    assert pool_daemon.call("workspace.get", ref=ref)["state"] == "running"
    visits = [s for s in pool_daemon.call("session.list") if s["kind"] == "http"]
    mine = [v for v in visits if v["workspace"] == ref and v["user"] == owner]
    assert mine and mine[0]["requests"] >= 1


def test_long_download_and_upload_stream_with_flat_daemon_memory(
    pool_daemon: Daemon, web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    ref = f"{owner}/{name}"
    ok(
        pool_daemon,
        ref,
        "printf '%s\\n' '#!/bin/sh' "
        "'printf \"Content-Type: application/octet-stream\\r\\n\\r\\n\"' "
        "'head -c 1073741824 /dev/zero' > /srv/www/cgi-bin/big && "
        "printf '%s\\n' '#!/bin/sh' 'printf \"Content-Type: text/plain\\r\\n\\r\\n\"' 'wc -c' "
        "> /srv/www/cgi-bin/count && chmod +x /srv/www/cgi-bin/big /srv/www/cgi-bin/count",
    )
    cookie = web.login_cookie(owner)
    pid = int(json.loads((pool_daemon.data_dir / "serve.json").read_text())["pid"])
    rss_before = rss(pid)
    res = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(web.ca),
            "-H",
            f"Cookie: {cookie}",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download}",
            web.url(owner, name, "/cgi-bin/big"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.stdout.split() == ["200", str(1 << 30)], res
    res = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(web.ca),
            "-H",
            f"Cookie: {cookie}",
            # a form post of the app's own page, as a browser sends it
            "-H",
            f"Origin: {web.url(owner, name, '').rstrip('/')}",
            "--data-binary",
            "@-",
            web.url(owner, name, "/cgi-bin/count"),
        ],
        input=b"x" * (64 << 20),
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert res.stdout.decode().strip() == str(64 << 20), res
    # den is not in the data path: its memory does not follow the bytes.
    assert rss(pid) - rss_before < 20 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_other_sites_cannot_use_your_sign_in(
    pool_daemon: Daemon, web: Web, users: Users, site: tuple[str, str]
) -> None:
    """Cross-site request forgery from another workspace's page (all workspace hosts
    are one site to a browser): only navigations and the app's own requests carry den's
    sign-in."""
    owner, name = site
    ref = f"{owner}/{name}"
    cookie = web.login_cookie(owner)
    page = web.url(owner, name, "/cgi-bin/env")
    origin = web.url(owner, name, "").rstrip("/")
    evil = f"https://evil--mallory.den.localhost:{web.port}"
    before = hits(pool_daemon, ref)
    for headers in (
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Origin": evil},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors", "Origin": evil},
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "websocket", "Origin": evil},
        {"Origin": evil},  # a browser without Sec-Fetch-*
        {},  # nor an Origin: only a safe method may use the cookie then
        # a frame of another workspace's page (Lax cookies go to same-site frames)
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"},
    ):
        method = "GET" if headers.get("Sec-Fetch-Mode") == "navigate" else "POST"
        r = web.curl(page, "-X", method, "-d", "x=1", headers=headers, cookie=cookie)
        assert r.status == 403 and "another site" in r.text, headers
    assert hits(pool_daemon, ref) == before
    # A link from elsewhere (a top-level GET navigation) still works, as do the app's own
    # requests and clients that are no browser.
    nav = {
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-Dest": "document",
    }
    assert web.curl(page, headers=nav, cookie=cookie).status == 200
    own = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Origin": origin}
    assert web.curl(page, "-X", "POST", "-d", "x=1", headers=own, cookie=cookie).status == 200
    assert web.curl(page, cookie=cookie).status == 200  # a GET from a client, no browser
    # A public workspace still serves such a request, as to anyone: without the sign-in.
    pool_daemon.call("share.set", ref=ref, mode="public")
    r = web.curl(
        page, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}, cookie=cookie
    )
    assert r.status == 200 and "HTTP_X_DEN_USER" not in cgi_env(r.text)


def test_planted_session_cookies_sign_you_out_not_in_as_someone_else(
    web: Web, users: Users, site: tuple[str, str]
) -> None:
    owner, name = site
    mine, theirs = web.login_cookie(owner), web.login_cookie(users.make())
    url = web.url(owner, name, "/cgi-bin/env")
    assert web.curl(url, cookie=mine).status == 200
    # A second, valid session of another user (set by some page's script for den's domain).
    assert web.curl(url, cookie=f"{theirs}; {mine}").status == 302
    assert web.curl(url, cookie=f"{mine}; den_session=junk").status == 200
    # More than den looks at (planted for longer paths, sent first): signed out, never
    # signed in by the first few.
    many = "; ".join([f"den_session=junk{i}" for i in range(4)] + [mine])
    assert web.curl(url, cookie=many).status == 302


def test_sign_in_page_names_the_user_and_next_stays_on_den(
    pool_daemon: Daemon, web: Web, site: tuple[str, str]
) -> None:
    owner, name = site
    link = pool_daemon.call_as(owner, "login.link")["result"]["url"]
    r = web.curl(link)
    assert r.status == 200 and f"Sign this browser in to den as {owner}?" in r.text
    t = link.split("t=", 1)[1]
    target = web.url(owner, name, "/x?y=1")
    for nxt, where in (
        (target, target),
        ("https://evil.example\\@den.localhost/", web.home),
        (f"https://evil.example@{web.host(owner, name)}:{web.port}/", web.home),
        ("https://den.localhost.evil.example/", web.home),
        (f"https://{web.host(owner, name)}:1/", web.home),
        ("javascript:alert(1)", web.home),
    ):
        fresh = pool_daemon.call_as(owner, "login.link")["result"]["url"].split("t=", 1)[1]
        r = web.curl(
            web.home + "_den/login",
            "--data-urlencode",
            f"t={fresh}",
            "--data-urlencode",
            f"next={nxt}",
            headers={"Origin": web.home.rstrip("/")},
        )
        assert r.status == 303 and r.header("location") == where, (nxt, r.headers)
    # Another site's form cannot sign you in (login CSRF), with or without an Origin.
    for headers in (
        {"Origin": "https://evil.example"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
    ):
        r = web.curl(web.home + "_den/login", "--data-urlencode", f"t={t}", headers=headers)
        assert r.status == 403


def test_removing_a_key_and_logout_sign_browsers_out(
    pool_daemon: Daemon, web: Web, site: tuple[str, str], tmp_path: Path
) -> None:
    owner, name = site
    url = web.url(owner, name)
    _, public = ssh_key(tmp_path)
    key = pool_daemon.call("key.add", user=owner, key=public)
    first, second = web.login_cookie(owner), web.login_cookie(owner)
    assert web.curl(url, cookie=first).status == 200
    sid = second.split("=", 1)[1].split("_", 1)[0]
    assert pool_daemon.call_as(owner, "login.revoke", {"id": sid}).get("result") is not None
    assert web.curl(url, cookie=second).status == 302
    assert web.curl(url, cookie=first).status == 200
    # A key that may have been stolen: every browser it could have signed in goes.
    pool_daemon.call("key.remove", user=owner, fingerprint=key["fingerprint"])
    deadline = time.monotonic() + 10
    while web.curl(url, cookie=first).status != 302:
        assert time.monotonic() < deadline, "a removed key left a browser signed in"
        time.sleep(0.2)
