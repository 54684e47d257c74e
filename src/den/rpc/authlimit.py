"""Failed API authentications per client address, for the TCP listener.

``limit`` failed den tokens (unknown, expired, revoked) within ``window``
seconds put an address on hold: its further failures are answered at once
with -32006 and ``Retry-After`` until the oldest counted failure leaves the
window. A valid token is still served while its address is on hold, so one
client cannot lock out the others that share its address (every local user
is 127.0.0.1); guessing a 256-bit token secret is hopeless anyway, what the
hold stops is a client hammering the database with bad tokens. At most
``max_entries`` addresses are remembered: the least recently failed are forgotten first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Generic, TypeVar

MAX_ENTRIES = 10_000
K = TypeVar("K", bound=Hashable)


class Failures(Generic[K]):
    """Failures per key within a sliding window, in a table of bounded size
    (the least recently failed keys are forgotten first)."""

    def __init__(self, limit: int, window: float, max_entries: int = MAX_ENTRIES) -> None:
        self.limit = limit
        self.window = window
        self.max_entries = max_entries
        self.failures: OrderedDict[K, deque[float]] = OrderedDict()

    def _recent(self, addr: K, now: float) -> deque[float] | None:
        q = self.failures.get(addr)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self.failures[addr]
            return None
        return q

    def retry_after(self, addr: K) -> int:
        """Whole seconds until ``addr`` may fail again; 0 when it is not on hold."""
        now = time.monotonic()
        q = self._recent(addr, now)
        if q is None or len(q) < self.limit:
            return 0
        return max(1, math.ceil(q[0] + self.window - now))

    def failed(self, addr: K) -> None:
        now = time.monotonic()
        q = self._recent(addr, now) or deque(maxlen=self.limit)
        q.append(now)
        self.failures[addr] = q
        self.failures.move_to_end(addr)
        while len(self.failures) > self.max_entries:
            self.failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self.failures)


AuthFailures = Failures[str]  # per client address
