"""Caddy's configuration (its native JSON), made from den's settings.

Caddy carries bytes and terminates TLS; every decision is den's. For each
request to a workspace host Caddy first asks den's gate (a forward-auth
subrequest over a unix socket, without the body); on a 2xx it takes the
upstream address and the identity headers from den's answer and proxies
straight to the workspace; any other answer (a redirect to sign in, a 403, a
404 page) goes to the client as it is. The config is the same for every
workspace, share and custom domain: nothing is pushed to Caddy when they change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from den.config import Settings

# Headers den sets for the app and for itself; whatever arrives from outside
# under these names is dropped first.
DEN_HEADERS = "X-Den-*"
GATE = "/_den/gate"
ERROR = "/_den/error"
PAGES = "/_den/pages"


def _unix(path: Path) -> str:
    return f"unix/{path}"


def _gate_call(gate: Path, uri: str, extra: dict[str, list[str]]) -> dict[str, Any]:
    """A subrequest to den (GET, no body) describing the client's request in headers."""
    headers = {
        "X-Den-Host": ["{http.request.host}"],
        "X-Den-Uri": ["{http.request.uri}"],
        "X-Den-Method": ["{http.request.method}"],
        "X-Den-Remote": ["{http.request.remote.host}"],
        **extra,
    }
    return {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": _unix(gate)}],
        "rewrite": {"method": "GET", "uri": uri},
        "headers": {"request": {"set": headers}},
    }


def _from_gate(name: str) -> str:
    return "{http.reverse_proxy.header." + name + "}"


def _copy_or_drop(header: str, answer: str) -> list[dict[str, Any]]:
    """Set ``header`` to den's answer ``answer``; drop it when den answered it empty."""
    return [
        {"handle": [{"handler": "headers", "request": {"set": {header: [_from_gate(answer)]}}}]},
        {
            "match": [{"vars": {_from_gate(answer): [""]}}],
            "handle": [{"handler": "headers", "request": {"delete": [header]}}],
        },
    ]


def workspace_route(gate: Path) -> dict[str, Any]:
    """Every host but den's own: the gate decides, then Caddy proxies to the workspace."""
    check = _gate_call(gate, GATE, {})
    check["handle_response"] = [
        {
            "match": {"status_code": [2]},
            "routes": [
                {
                    "handle": [
                        {"handler": "vars", "den_upstream": _from_gate("X-Den-Upstream")},
                        {
                            "handler": "headers",
                            "request": {"set": {"X-Den-Share": [_from_gate("X-Den-Share")]}},
                        },
                    ]
                },
                *_copy_or_drop("X-Den-User", "X-Den-User"),
                # den's own cookies and credentials never reach the app.
                *_copy_or_drop("Cookie", "X-Den-Cookie"),
                *_copy_or_drop("Authorization", "X-Den-Authorization"),
            ],
        }
    ]
    proxy = {
        "handler": "reverse_proxy",
        "upstreams": [{"dial": "{http.vars.den_upstream}"}],
        # Stream both ways: server-sent events, long downloads and uploads.
        "flush_interval": -1,
        "transport": {"protocol": "http", "dial_timeout": "3s"},
        # An app may not plant den's cookies (for this host or, by Domain=, for all).
        "headers": {
            "response": {
                "replace": {
                    "Set-Cookie": [
                        {
                            "search_regexp": r"(?i)^\s*=?\s*(__Host-|__Secure-)?den_.*$",
                            "replace": "",
                        }
                    ]
                },
                # It would wipe den's sign-in for every workspace host at once.
                "delete": ["Clear-Site-Data"],
            }
        },
    }
    strip = {"handler": "headers", "request": {"delete": [DEN_HEADERS]}}
    return {"handle": [strip, check, proxy], "terminal": True}


def pages_route(settings: Settings, gate: Path) -> dict[str, Any]:
    """den's own pages at the domain itself (sign-in now, the dashboard next)."""
    call = _gate_call(gate, "", {})
    call["rewrite"] = {"uri": PAGES + "{http.request.uri}"}  # the method and body stay
    call["flush_interval"] = -1
    strip = {"handler": "headers", "request": {"delete": [DEN_HEADERS]}}
    return {
        "match": [{"host": [settings.domain]}],
        "handle": [strip, call],
        "terminal": True,
    }


def error_routes(gate: Path) -> list[dict[str, Any]]:
    """Caddy's own failures (the workspace does not answer) become den's pages."""
    call = _gate_call(
        gate,
        ERROR,
        {
            "X-Den-Status": ["{http.error.status_code}"],
            "X-Den-Upstream": ["{http.vars.den_upstream}"],
        },
    )
    return [{"handle": [call]}]


def build(
    settings: Settings, gate: Path, admin: Path, storage: Path, ask_url: str
) -> dict[str, Any]:
    """The whole configuration Caddy runs with."""
    domain = settings.domain
    listen = f"{settings.web_host}:{settings.web_port}"
    server: dict[str, Any] = {
        "listen": [listen],
        "routes": [pages_route(settings, gate), workspace_route(gate)],
        "errors": {"routes": error_routes(gate)},
        # TLS on every connection, also for hosts no route names (custom domains).
        "tls_connection_policies": [{}],
        "automatic_https": {"disable_redirects": True},
        "protocols": ["h1", "h2"],
        "max_header_bytes": 64 * 1024,
        "read_header_timeout": 30_000_000_000,
        "idle_timeout": 300_000_000_000,
    }
    wildcard = [domain, f"*.{domain}"]
    if settings.tls == "internal":
        # Caddy's own CA: a wildcard for workspace URLs, on demand for custom domains.
        issuers: list[dict[str, Any]] = [{"module": "internal"}]
        policies: list[dict[str, Any]] = [
            {"subjects": wildcard, "issuers": issuers},
            {"issuers": issuers, "on_demand": True},
        ]
        certificates: dict[str, Any] = {"automate": wildcard}
    else:
        # A public CA: a wildcard needs DNS challenges, so every name is issued
        # on demand, for the names den's ask endpoint says it serves.
        acme: dict[str, Any] = {"module": "acme"}
        if settings.acme_email:
            acme["email"] = settings.acme_email
        if settings.acme_ca:
            acme["ca"] = settings.acme_ca
        issuers = [acme]
        policies = [{"issuers": issuers, "on_demand": True}]
        certificates = {}
    on_demand: dict[str, Any] = {"ask": ask_url}
    if settings.tls == "acme":
        # A public CA limits certificates per domain and week: a burst of new
        # names (many published ports) must not use the week up at once.
        on_demand["rate_limit"] = {"interval": 60_000_000_000, "burst": 5}
    tls: dict[str, Any] = {"automation": {"policies": policies, "on_demand": on_demand}}
    if certificates:
        tls["certificates"] = certificates
    servers: dict[str, Any] = {"den": server}
    http: dict[str, Any] = {"https_port": settings.web_port, "servers": servers}
    if settings.tls == "acme":
        # Port 80: ACME's HTTP challenge (Caddy answers it), a redirect to HTTPS for the rest.
        http["http_port"] = 80
        servers["den_http"] = {
            "listen": [f"{settings.web_host}:80"],
            "routes": [
                {
                    "handle": [
                        {
                            "handler": "static_response",
                            "status_code": 308,
                            "headers": {
                                "Location": ["https://{http.request.host}{http.request.uri}"]
                            },
                        }
                    ]
                },
            ],
        }
    return {
        "admin": {"listen": _unix(admin), "config": {"persist": False}},
        "storage": {"module": "file_system", "root": str(storage)},
        "logging": {"logs": {"default": {"level": "WARN"}}},
        "apps": {
            "http": http,
            "tls": tls,
            # Never touch the host's trust store: `den ca` prints the root instead.
            "pki": {"certificate_authorities": {"local": {"name": "den", "install_trust": False}}},
        },
    }
