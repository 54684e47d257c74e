"""``POST /_den/do/{method}``: every state-changing control of the dashboard is a
registered method, called as the signed-in browser's user."""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from aiohttp import web

from den.errors import DenError, InvalidParams
from den.rpc.registry import REGISTRY, Method
from den.web.dash.base import browser, call, render, same_origin, set_flash

# Their results hold a secret shown this once: rendered in the POST's own answer,
# never carried through a redirect, a cookie or a URL.
SECRET_ONCE = {"token.create": "token", "login.link": "url", "share.link": "url"}
MAX_FIELDS = 100


def local_path(value: str, default: str = "/") -> str:
    """``_next``: a path of this site only ("//host" and "/\\host" lead elsewhere)."""
    if (
        value.startswith("/")
        and not value.startswith(("//", "/\\"))
        and len(value) <= 2000
        and not any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in value)
    ):
        return value
    return default


def _is_list(annotation: Any) -> bool:
    if typing.get_origin(annotation) is list:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return False


async def _params(request: web.Request, m: Method) -> tuple[dict[str, Any], str]:
    """The method's params from the form (or a JSON object), and where to go after."""
    if request.content_type == "application/json":
        try:
            raw = json.loads(await request.read())
        except ValueError:
            raise InvalidParams("the body is not JSON") from None
        if not isinstance(raw, dict):
            raise InvalidParams("the body must be a JSON object")
        nxt = raw.pop("_next", "/")
        return {k: v for k, v in raw.items() if not k.startswith("_")}, local_path(str(nxt))
    form = await request.post()
    if len(form) > MAX_FIELDS:
        raise InvalidParams(f"at most {MAX_FIELDS} form fields")
    lists = {name for name, f in m.params.model_fields.items() if _is_list(f.annotation)}
    params: dict[str, Any] = {}
    for key, value in form.items():
        if key.startswith("_") or not isinstance(value, str) or value == "":
            continue  # empty fields are left to the method's defaults
        if key in lists:
            params.setdefault(key, []).append(value)
        else:
            params[key] = value
    return params, local_path(str(form.get("_next", "/")))


def message(err: DenError) -> str:
    """What went wrong, in words (never a traceback)."""
    text = err.message
    data = err.data
    if isinstance(data, dict) and isinstance(data.get("errors"), list):
        data = data["errors"]
    if isinstance(data, list):
        parts = [
            f"{e.get('field', '')}: {e.get('message', '')}" for e in data if isinstance(e, dict)
        ]
        if parts:
            text += " (" + "; ".join(parts) + ")"
    return text


def _status(err: DenError) -> int:
    from den.errors import Conflict, Forbidden, InternalError, NotFound, Unauthenticated

    for kind, status in (
        (NotFound, 404), (Forbidden, 403), (Unauthenticated, 401), (Conflict, 409),
        (InternalError, 500),
    ):  # fmt: skip
        if isinstance(err, kind):
            return status
    return 400


async def do_handler(request: web.Request) -> web.StreamResponse:
    name = request.match_info["method"]
    m = REGISTRY.methods.get(name)
    if m is None:
        raise web.HTTPNotFound()
    wants_json = "application/json" in request.headers.get("Accept", "")
    b = await browser(request)
    if not same_origin(request, b):
        # Another site's page posting here with this browser's cookie: nothing is called.
        if wants_json:
            return web.json_response({"error": {"code": 403, "message": "cross-site request"}},
                                     status=403)  # fmt: skip
        return render(request, "refused.html", 403, b=None, title="Refused")
    if b.caller is None:
        if wants_json:
            return web.json_response({"error": {"code": 401, "message": "not signed in"}},
                                     status=401)  # fmt: skip
        raise web.HTTPSeeOther("/_den/login", headers={"Cache-Control": "no-store"})
    nxt = "/"
    try:
        params, nxt = await _params(request, m)
        result = await call(b, name, params)
    except DenError as err:
        if wants_json:
            return web.json_response({"error": err.to_error()}, status=_status(err))
        resp = web.HTTPSeeOther(nxt, headers={"Cache-Control": "no-store"})
        set_flash(resp, b, False, message(err))
        return resp
    if wants_json:
        return web.json_response({"result": result}, headers={"Cache-Control": "no-store"})
    if name in SECRET_ONCE:
        return render(
            request, "secret.html", b=b, title="Shown once", method=name, result=result,
            secret=result.get(SECRET_ONCE[name], ""), next=nxt,
        )  # fmt: skip
    resp = web.HTTPSeeOther(nxt, headers={"Cache-Control": "no-store"})
    target = params.get("ref") or params.get("name") or params.get("id") or ""
    set_flash(resp, b, True, f"{name} {target}: done".replace("  ", " ") + _more(name, result))
    return resp


def _duration(seconds: int) -> str:
    if seconds <= 0:
        return "never"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _more(name: str, result: Any) -> str:
    """What a result says that the next page does not show."""
    if name == "workspace.idle" and isinstance(result, dict):
        return (
            f" (suspends after {_duration(int(result['effective_suspend']))} idle, "
            f"stops after {_duration(int(result['effective_stop']))})"
        )
    return ""
