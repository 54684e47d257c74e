"""den's own small HTML pages: sign-in, errors (plain, no scripts, no Caddy pages)."""

from __future__ import annotations

from html import escape

from aiohttp import web

_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;"
    "color:#222}h1{font-size:1.4rem}code{background:#f2f2f2;padding:.1rem .3rem;border-radius:3px}"
    "button{font-size:1rem;padding:.4rem 1rem}"
)
# Nothing on these pages loads from elsewhere, runs a script or may be framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def page(
    title: str,
    body_html: str,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A page: ``body_html`` is already escaped; ``title`` is escaped here."""
    text = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width">'
        f"<title>{escape(title)} · den</title><style>{_STYLE}</style></head>"
        f"<body><h1>{escape(title)}</h1>{body_html}</body></html>"
    )
    resp = web.Response(text=text, status=status, content_type="text/html")
    resp.headers.update(SECURITY_HEADERS)
    if headers:
        resp.headers.update(headers)
    return resp


def para(*parts: str) -> str:
    """A paragraph of plain text parts (escaped)."""
    return "<p>" + "".join(escape(p) for p in parts) + "</p>"


def code(text: str) -> str:
    return f"<code>{escape(text)}</code>"


def not_found() -> web.Response:
    # The same words for an unknown host and for one you may not open: nothing
    # tells which workspaces exist.
    return page("Not found", para("There is nothing at this address that you may open."), 404)
