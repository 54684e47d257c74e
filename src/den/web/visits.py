"""Who has been using workspace URLs lately: ``den sessions`` lists them as kind ``http``.

HTTP has no connection that lasts a session, so a visit is a (workspace, who,
how, client address) seen within the last ``IDLE`` seconds.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

IDLE = 300.0
LIMIT = 10_000


@dataclass
class Visit:
    id: str
    ws_id: str
    workspace: str
    user: str
    how: str
    client: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last: float = field(default_factory=time.monotonic)
    requests: int = 0


class Visits:
    def __init__(self) -> None:
        self._visits: dict[tuple[str, str, str, str], Visit] = {}

    def seen(self, ws_id: str, workspace: str, user: str, how: str, client: str) -> None:
        key = (ws_id, user, how, client)
        visit = self._visits.get(key)
        if visit is None:
            if len(self._visits) >= LIMIT:
                self.prune()
            vid = "h" + hashlib.sha256(repr(key).encode()).hexdigest()[:11]
            visit = self._visits[key] = Visit(vid, ws_id, workspace, user, how, client)
        visit.last = time.monotonic()
        visit.requests += 1

    def prune(self) -> None:
        now = time.monotonic()
        for key, v in list(self._visits.items()):
            if now - v.last > IDLE:
                del self._visits[key]
        if len(self._visits) >= LIMIT:  # a flood of addresses: keep the newest half
            keep = sorted(self._visits.items(), key=lambda kv: kv[1].last)[LIMIT // 2 :]
            self._visits = dict(keep)

    def live(self) -> list[Visit]:
        self.prune()
        return list(self._visits.values())
