"""``den tui``: an interactive terminal UI (Textual), a client of den's API like the CLI."""

from __future__ import annotations

from den.cli.client import Client
from den.cli.tui.api import Api, Runner, run_foreground, ssh_command
from den.cli.tui.app import DenTui

__all__ = ["Api", "DenTui", "Runner", "run", "ssh_command"]


def run(client: Client, interval: float = 1.5) -> None:
    """Run the TUI on this terminal until the user quits."""
    DenTui(Api(client), interval, run_foreground).run()
