"""The metadata service's own endpoints (the workspace is the listener's: identity()).

GET answers need no credential: the socket says which workspace asks, and
each answer is about that workspace alone. POST /v1/rpc needs the workspace's
scoped token (as den's API does, calls carry a bearer); /v1/busy acts as the
workspace's scoped caller through the registry, so it is checked and audited
like any call.

What hands out a secret (/v1/token, /v1/env) or changes something (/v1/busy
writes) also needs the header ``Den-Metadata: true`` and refuses a request
carrying ``X-Forwarded-For`` or ``Forwarded``: a web app inside with a
server-side request forgery hole (it fetches a URL it is given) sends neither
a header of the attacker's choosing nor, when it is a proxy, without saying it
forwards; the clouds' metadata services do the same (``Metadata-Flavor``).
"""

from __future__ import annotations

import shlex
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy import select

from den.db.models import SshKey
from den.errors import DenError, InvalidRequest
from den.meta import token
from den.meta.server import META_ROUTES, den_app, identity
from den.rpc.jsonrpc import handle_body
from den.rpc.registry import REGISTRY

INDEX = """den metadata service (this workspace only)

/v1/token, /v1/env and POST or DELETE /v1/busy need the header 'Den-Metadata: true'
(e.g. curl -H 'Den-Metadata: true' ...) and refuse proxied requests (X-Forwarded-For).

GET  /v1/identity        who am I: workspace, owner, URL (JSON)
GET  /v1/keys            the owner's public SSH keys (authorized_keys lines)
GET  /v1/env             variables set by the owner or an admin (JSON; ?format=sh: export lines)
GET  /v1/token           a short-lived token for den's API, scoped to this workspace
                         (JSON; ?format=text: the token alone)
POST /v1/rpc             JSON-RPC into den with that token (Authorization: Bearer ...)
GET  /v1/busy            the busy lease, if any
POST /v1/busy?for=20m    keep this workspace awake (also: den-busy 20m; for=0 ends it)
DELETE /v1/busy          end the lease
"""


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _err(err: DenError, status: int) -> web.Response:
    return _json({"error": err.to_error()}, status)


HEADER = "Den-Metadata"
_PROXIED = ("X-Forwarded-For", "Forwarded")


def _guarded(request: web.Request) -> web.Response | None:
    """The 403 for a request that may be forged or forwarded (see the module's text)."""
    for name in _PROXIED:
        if name in request.headers:
            return web.Response(
                status=403,
                text=f"den metadata: refused, the request carries {name} (a proxy forwarded "
                "it); ask from the workspace itself\n",
            )
    if request.headers.get(HEADER, "").strip().lower() != "true":
        return web.Response(
            status=403,
            text=f"den metadata: add the header '{HEADER}: true' to this request\n",
        )
    return None


_STATUS = {"unauthenticated": 401, "forbidden": 403, "not_found": 404, "invalid_params": 400}


async def index(request: web.Request) -> web.Response:
    identity(request)
    return web.Response(text=INDEX)


async def get_identity(request: web.Request) -> web.Response:
    ident = identity(request)
    app = den_app(request)
    url = ""
    if app.settings.web:
        from den.web.urls import workspace_url

        url = workspace_url(app.settings, ident.owner, ident.name)
    return _json(
        {
            "workspace": ident.name,
            "ref": ident.ref,
            "id": ident.ws_id,
            "owner": ident.owner,
            "url": url,
        }
    )


async def get_keys(request: web.Request) -> web.Response:
    ident = identity(request)
    async with den_app(request).sessions() as db:
        keys = (
            (
                await db.execute(
                    select(SshKey).where(SshKey.user_id == ident.owner_id).order_by(SshKey.id)
                )
            )
            .scalars()
            .all()
        )
    return web.Response(text="".join(k.public_key.strip() + "\n" for k in keys))


async def get_env(request: web.Request) -> web.Response:
    from den.services.envvars import env_of

    ident = identity(request)
    if (refused := _guarded(request)) is not None:
        return refused
    app = den_app(request)
    async with app.sessions() as db:
        env = await env_of(app, db, ident.ws_id, ident.owner_id)
    if request.query.get("format") == "sh":
        return web.Response(text="".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return _json(env)


async def get_token(request: web.Request) -> web.Response:
    ident = identity(request)
    if (refused := _guarded(request)) is not None:
        return refused
    app = den_app(request)
    value, expires = token.issue(app, ident)
    if request.query.get("format") == "text":  # for $(...) in a shell: the token alone
        return web.Response(text=value + "\n")
    return _json({"token": value, "expires": expires, "workspace": ident.ref})


async def post_rpc(request: web.Request) -> web.StreamResponse:
    ident = identity(request)
    app = den_app(request)
    try:
        caller = await token.verify(app, request.headers.get("Authorization"))
    except DenError as err:
        return _err(err, 401)
    if caller.scope != ident.ws_id:  # another workspace's token: not here
        from den.errors import Forbidden

        return _err(Forbidden("this token belongs to another workspace"), 403)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _err(InvalidRequest("the request body is too large"), 413)
    out = await handle_body(app, caller, body)
    if out is None:
        return web.Response(status=204)
    return web.Response(body=out, content_type="application/json")


async def busy(request: web.Request) -> web.Response:
    ident = identity(request)
    app = den_app(request)
    params: dict[str, Any] = {"ref": ident.ref}
    if request.method != "GET" and (refused := _guarded(request)) is not None:
        return refused
    if request.method == "POST":
        params["duration"] = request.query.get("for", "1h")
    elif request.method == "DELETE":
        params["duration"] = "0"
    caller = token.scoped_caller(ident.owner, ident.owner_id, ident.ws_id, tag="metadata")
    try:
        out = await REGISTRY.call(app, caller, "workspace.busy", params)
    except DenError as err:
        return _err(err, _STATUS.get(err.kind, 500))
    return _json(out)


def _add(router: web.UrlDispatcher) -> None:
    router.add_get("/", index)
    router.add_get("/v1/identity", get_identity)
    router.add_get("/v1/keys", get_keys)
    router.add_get("/v1/env", get_env)
    router.add_get("/v1/token", get_token)
    router.add_post("/v1/rpc", post_rpc)
    router.add_route("*", "/v1/busy", busy)


META_ROUTES.append(_add)
