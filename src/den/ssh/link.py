"""What every channel of one authenticated connection shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from den.app import App
    from den.rpc.registry import Caller
    from den.ssh.table import SshSession


@dataclass
class Link:
    app: App
    caller: Caller
    ref: str | None  # "OWNER/NAME" of the workspace, or None for the den shell
    session: SshSession
    client: tuple[str, int]
    server: tuple[str, int]

    def count_in(self, n: int) -> None:
        self.session.bytes_in += n

    def count_out(self, n: int) -> None:
        self.session.bytes_out += n
