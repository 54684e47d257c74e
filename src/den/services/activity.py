"""Activity of workspaces as den sees it: input, output, exec and transfers.

Front doors (SSH sessions, exec, sftp, the HTTP proxy) report here; the idle
checker adds what it measures itself (CPU, network). An open but silent
connection reports nothing, so it does not keep a workspace awake.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Activity:
    def __init__(self) -> None:
        self._last: dict[str, tuple[float, str]] = {}
        self._busy: defaultdict[str, int] = defaultdict(int)
        # The last time of each kind, for `den why` (den.services.why).
        self._kinds: defaultdict[str, dict[str, float]] = defaultdict(dict)

    def touch(self, ws_id: str, kind: str) -> None:
        """Something happened in or for the workspace just now."""
        now = time.time()
        self._last[ws_id] = (now, kind)
        self._kinds[ws_id][kind] = now

    def kinds(self, ws_id: str) -> dict[str, float]:
        """The last time of each kind of activity den saw since it started."""
        return dict(self._kinds.get(ws_id, {}))

    @contextmanager
    def busy(self, ws_id: str, kind: str) -> Iterator[None]:
        """The workspace counts as active while the block runs (an exec, a transfer)."""
        self._busy[ws_id] += 1
        self.touch(ws_id, kind)
        try:
            yield
        finally:
            self._busy[ws_id] -= 1
            if self._busy[ws_id] <= 0:
                del self._busy[ws_id]
            self.touch(ws_id, kind)

    def is_busy(self, ws_id: str) -> str | None:
        """The kind of a long operation under way, if any."""
        if self._busy.get(ws_id):
            return self._last.get(ws_id, (0.0, "busy"))[1]
        return None

    def last(self, ws_id: str) -> tuple[float, str] | None:
        return self._last.get(ws_id)

    def forget(self, ws_id: str) -> None:
        self._last.pop(ws_id, None)
        self._busy.pop(ws_id, None)
        self._kinds.pop(ws_id, None)
