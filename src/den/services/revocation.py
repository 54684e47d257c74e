"""Revocations: a key removed, a user deleted or demoted.

Credentials checked per request (API tokens, unix peers) need nothing more.
What authenticated once and stays open (an SSH connection) subscribes here and
is told right after the change commits, so it can end or downgrade itself at
once instead of keeping what it had at login.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from sqlalchemy import event

if TYPE_CHECKING:
    from den.rpc.registry import Context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Revoked:
    """What changed for one user: ``key`` (fingerprint gone), ``user`` (deleted)
    or ``role`` (now ``role``)."""

    kind: Literal["key", "user", "role"]
    user_id: int
    user: str
    fingerprint: str = ""
    role: str = ""


Subscriber = Callable[[Revoked], None]


class Revocations:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn`` for every revocation from now on; returns the unsubscribe."""
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def publish(self, ev: Revoked) -> None:
        for fn in list(self._subscribers):
            try:
                fn(ev)
            except Exception:
                log.exception("revocation subscriber failed", extra={"ctx": {"kind": ev.kind}})

    def after_commit(self, ctx: Context, ev: Revoked) -> None:
        """Publish ``ev`` once the call's transaction commits (never if it rolls back)."""
        loop = asyncio.get_running_loop()

        def committed(_session: object) -> None:
            # Out of the commit (and its greenlet): subscribers close connections.
            loop.call_soon(self.publish, ev)

        event.listen(ctx.db.sync_session, "after_commit", committed, once=True)
