"""den's pages against a hostile neighbour: a page on a workspace URL is same-site with
den's domain, so the browser sends den's session cookie along with its requests."""

from __future__ import annotations

from tests.conftest import Daemon
from tests.web.conftest import Web
from tests.workspaces.conftest import Users


def test_event_streams_are_refused_to_other_pages(
    pool_daemon: Daemon, web: Web, users: Users
) -> None:
    member = users.make("member")
    cookie = web.login_cookie(member)
    # A workspace's page (same-site) or another site's: each stream held open would be a
    # registry poll a second as this user, and eight of them lock den's own pages out.
    for site in ("same-site", "cross-site"):
        reply = web.curl(
            web.home + "_den/events",
            headers={"Sec-Fetch-Site": site, "Sec-Fetch-Mode": "no-cors"},
            cookie=cookie,
            timeout=10,
        )
        assert reply.status == 403, (site, reply.status, reply.text[:200])
