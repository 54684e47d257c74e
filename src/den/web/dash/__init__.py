"""den's web dashboard: server-rendered pages over the one method registry.

The same routes are served on den's TCP listener (prefix "") and at den's domain
through Caddy (prefix ``/_den/pages``, which Caddy puts before every path there).
"""

from __future__ import annotations

from aiohttp import web


def add_routes(router: web.UrlDispatcher, prefix: str) -> None:
    """Every dashboard route, under ``prefix``."""
    from den.web import term
    from den.web.dash import admin, events, member
    from den.web.dash.base import static_handler
    from den.web.dash.do import do_handler

    router.add_get(prefix + "/_den/static/{path:.+}", static_handler)
    router.add_post(prefix + "/_den/do/{method}", do_handler)
    router.add_get(prefix + "/_den/events", events.events_handler, allow_head=False)
    member.add_routes(router, prefix)
    term.add_routes(router, prefix)  # the browser terminal (den.web.term)
    admin.add_routes(router, prefix)  # the admin pages (den.web.dash.admin)
    # The admin pages (helper B) and the browser terminal (helper C) add their line here.
