"""`den top`: a live table of workspaces by CPU and memory."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table


def _mib(n: int) -> str:
    return f"{n / 1048576:.0f}M"


def render(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="den top (Ctrl-C quits)", header_style="bold")
    for col in ("workspace", "state", "cpu", "memory", "limit", "pids", "last activity"):
        table.add_column(
            col, justify="right" if col in ("cpu", "memory", "limit", "pids") else "left"
        )
    for r in rows:
        table.add_row(
            r["ref"],
            r["state"],
            f"{r['cpu_cores'] * 100:.1f}%",
            _mib(r["memory_bytes"]),
            _mib(r["memory_limit_bytes"]),
            str(r["pids"]),
            f"{(r.get('last_activity_at') or '-')[:19].replace('T', ' ')} {r['last_activity_kind']}",
        )
    return table


def top(
    ctx: typer.Context,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.5)] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one table and exit.")] = False,
) -> None:
    """A live table of your workspaces (admins: all) by CPU and memory use."""
    from den.cli.main import call

    state = ctx.obj
    if once:
        from den.cli import render as out

        out.console.print(render(call(state, "workspace.usage", {})))
        return
    try:
        with Live(render(call(state, "workspace.usage", {})), refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                live.update(render(call(state, "workspace.usage", {})))
    except KeyboardInterrupt:
        pass
