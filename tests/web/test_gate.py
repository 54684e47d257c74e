"""The gate through the real Caddy: who gets in, what the app is told, what is refused.

Each test makes its own users and a busybox workspace whose httpd serves a
page and a CGI script that prints the request's environment (the headers the
app receives).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import Daemon
from tests.web.conftest import Web, serve_files
from tests.workspaces.conftest import Users, create, make_users, ok

CGI = (
    "mkdir -p /srv/www/cgi-bin && printf '%s\\n' '#!/bin/sh' "
    "'printf \"Content-Type: text/plain\\r\\n\\r\\n\"' 'env' > /srv/www/cgi-bin/env "
    "&& chmod +x /srv/www/cgi-bin/env"
)


@pytest.fixture
def users(pool_daemon: Daemon) -> Iterator[Users]:
    with make_users(pool_daemon) as u:
        yield u


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


def test_unknown_hosts_get_the_same_plain_404(web: Web, site: tuple[str, str]) -> None:
    owner, _ = site
    for host in (f"nope--{owner}.den.localhost", "zz.den.localhost", "0--abcdef.den.localhost"):
        r = web.curl(f"https://{host}:{web.port}/")
        assert r.status == 404
        assert "There is nothing at this address." in r.text
        assert "caddy" not in r.text.lower()
