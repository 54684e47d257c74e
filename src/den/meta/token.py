"""The workspace-scoped token /v1/token hands out.

Stateless and sealed (den.secretbox, AES-256-GCM, purpose "ws-token"): the
token is the sealed JSON ``{w: workspace id, u: owner id, x: expiry}``, so den
stores nothing per token and a workspace may ask for one as often as it likes.
It is checked against the database on every use: it dies with its workspace
(deleted: workspace ids are random, never reused), with its owner's access
(the user deleted, or the workspace no longer theirs) and at its expiry
(``meta_token_seconds``). Its caller carries ``scope`` = the workspace:
the registry lets it call only SCOPED_METHODS, and find_workspace finds no
other workspace for it.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
from typing import TYPE_CHECKING

import orjson

from den import secretbox
from den.errors import DenError, Unauthenticated
from den.rpc.registry import Caller, Right

if TYPE_CHECKING:
    from den.app import App
    from den.meta.server import WsIdentity

PREFIX = "denws_"
_PURPOSE = "ws-token"


def issue(app: App, ident: WsIdentity) -> tuple[str, int]:
    """A fresh token for the workspace and its expiry (Unix seconds)."""
    expires = int(time.time()) + app.settings.meta_token_seconds
    payload = {"w": ident.ws_id, "u": ident.owner_id, "x": expires, "n": secrets.token_hex(4)}
    sealed = secretbox.seal(app.settings.data_dir, orjson.dumps(payload), _PURPOSE)
    # "v1:" + standard base64: made URL- and header-safe.
    raw = base64.b64decode(sealed.removeprefix("v1:"))
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("="), expires


def scoped_caller(owner: str, owner_id: int, ws_id: str, tag: str = "") -> Caller:
    """A caller that may act on the one workspace ``ws_id``, never as an admin."""
    return Caller(
        owner, "member", Right.write, "meta", user_id=owner_id, token_id=tag or None, scope=ws_id
    )


async def verify(app: App, header: str | None) -> Caller:
    """The scoped caller a ``Bearer denws_...`` header stands for."""
    if not header:
        raise Unauthenticated("send 'Authorization: Bearer <token>' (GET /v1/token gives one)")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value.startswith(PREFIX):
        raise Unauthenticated("the token must be a workspace token from GET /v1/token")
    text = value[len(PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        if len(raw) < 29:
            raise ValueError
        opened = secretbox.unseal(
            app.settings.data_dir, "v1:" + base64.b64encode(raw).decode(), _PURPOSE
        )
        payload = orjson.loads(opened)
        ws_id, owner_id, expires = str(payload["w"]), int(payload["u"]), int(payload["x"])
    except (ValueError, binascii.Error, KeyError, TypeError, DenError, orjson.JSONDecodeError):
        raise Unauthenticated("not a valid workspace token") from None
    if expires <= time.time():
        raise Unauthenticated("this workspace token has expired: GET /v1/token gives a new one")
    from den.services.workspaces import workspace_by_id

    async with app.sessions() as db:
        row = await workspace_by_id(db, ws_id)
    if row is None or row[1].id != owner_id or row[0].state == "deleting":
        raise Unauthenticated("this workspace token is revoked: its workspace or owner is gone")
    return scoped_caller(row[1].name, owner_id, ws_id, tag=f"ws:{payload.get('n', '')}")
