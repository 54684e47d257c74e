"""JSON-RPC 2.0: parsing, batches, notifications and error objects.

This is the one boundary where :class:`den.errors.DenError` becomes a response.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from den.errors import DenError, InternalError, InvalidRequest, ParseError
from den.rpc.registry import REGISTRY, Caller, Registry

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
_NO_ID = object()


def error_response(err: DenError, req_id: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": err.to_error(), "id": req_id}


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


async def handle_one(
    app: App, caller: Caller, req: Any, registry: Registry
) -> dict[str, Any] | None:
    """Run one request object; return its response, or None for a notification."""
    if not isinstance(req, dict):
        return error_response(InvalidRequest("Invalid Request"))
    req_id = req.get("id", _NO_ID)
    if req_id is not _NO_ID and not _valid_id(req_id):
        return error_response(InvalidRequest("Invalid Request", data={"reason": "invalid id"}))
    reply_id = None if req_id is _NO_ID else req_id
    name = req.get("method")
    params = req.get("params")
    if (
        req.get("jsonrpc") != "2.0"
        or not isinstance(name, str)
        or ("params" in req and not isinstance(params, dict | list))
    ):
        return error_response(InvalidRequest("Invalid Request"), reply_id)
    try:
        result = await registry.call(app, caller, name, params)
    except DenError as err:
        return None if req_id is _NO_ID else error_response(err, reply_id)
    except Exception:  # the isolation boundary: a bug must not take the server down
        log.exception("unhandled error in %s", name)
        return (
            None if req_id is _NO_ID else error_response(InternalError("Internal error"), reply_id)
        )
    if req_id is _NO_ID:
        return None
    return {"jsonrpc": "2.0", "result": result, "id": req_id}


async def handle_body(
    app: App, caller: Caller, body: bytes, registry: Registry = REGISTRY
) -> bytes | None:
    """Handle a whole HTTP body; return the response body, or None for no response."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return orjson.dumps(error_response(ParseError("Parse error")))
    if isinstance(payload, list):
        if not payload:
            return orjson.dumps(error_response(InvalidRequest("Invalid Request")))
        responses = []
        for req in payload:
            resp = await handle_one(app, caller, req, registry)
            if resp is not None:
                responses.append(resp)
        return orjson.dumps(responses) if responses else None
    resp = await handle_one(app, caller, payload, registry)
    return orjson.dumps(resp) if resp is not None else None
