"""The live SSH sessions of the daemon: one per authenticated connection, and
one per browser terminal (kind ``web``, den.web.term).

Kept in memory: a session lives exactly as long as its TCP connection (a
browser terminal: its shell), so a restarted daemon has none to remember.
"""

from __future__ import annotations

import builtins
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime


@dataclass
class SshSession:
    """One authenticated connection and what it does."""

    user: str
    workspace: str  # "OWNER/NAME", or "" for the den shell
    client: str  # "ADDRESS:PORT"
    close: Callable[[], None] = field(repr=False)
    id: str = field(default_factory=lambda: secrets.token_hex(4))
    kinds: list[str] = field(default_factory=list)  # shell, exec, sftp, forward, den, web
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    bytes_in: int = 0
    bytes_out: int = 0
    channels: int = 0

    @property
    def kind(self) -> str:
        return ",".join(self.kinds) if self.kinds else "idle"

    def opened(self, kind: str) -> None:
        """A channel of ``kind`` started on this connection."""
        self.channels += 1
        if kind not in self.kinds:
            self.kinds.append(kind)


class SessionTable:
    def __init__(self) -> None:
        self._by_id: dict[str, SshSession] = {}

    def add(self, s: SshSession) -> SshSession:
        self._by_id[s.id] = s
        return s

    def remove(self, s: SshSession) -> None:
        self._by_id.pop(s.id, None)

    def get(self, session_id: str) -> SshSession | None:
        return self._by_id.get(session_id)

    def list(self, user: str | None = None) -> builtins.list[SshSession]:
        rows = sorted(self._by_id.values(), key=lambda s: s.started_at)
        return [s for s in rows if user is None or s.user == user]

    def for_workspace(self, ref: str) -> builtins.list[SshSession]:
        """Sessions into one workspace (the idle detector keeps these awake)."""
        return [s for s in self._by_id.values() if s.workspace == ref]

    def close_all(self) -> None:
        for s in list(self._by_id.values()):
            s.close()
