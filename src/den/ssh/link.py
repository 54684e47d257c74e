"""What every channel of one authenticated connection shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from den.app import App
    from den.rpc.registry import Caller
    from den.ssh.agent import Forwarding
    from den.ssh.table import SshSession


@dataclass
class Link:
    app: App
    caller: Caller  # replaced when the user's role changes (see Connection.revoked)
    ref: str | None  # "OWNER/NAME" of the workspace, or None for the den shell
    session: SshSession
    client: tuple[str, int]
    server: tuple[str, int]
    fingerprint: str = ""  # of the key the connection logged in with
    revoked: bool = False  # the key or user is gone: nothing more runs for it
    agent: Forwarding | None = None  # the client lends its agent (ssh -A)

    def count_in(self, n: int) -> None:
        self.session.bytes_in += n

    def count_out(self, n: int) -> None:
        self.session.bytes_out += n
