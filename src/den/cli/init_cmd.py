"""`den init`: check the host and prepare it (packages, cgroups, storage pool)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer

from den import config as den_config
from den.cli import render
from den.errors import DenError
from den.host import checks as host_checks
from den.host import prepare


def _print_checks(results: list[host_checks.Check]) -> None:
    for c in results:
        mark = "[green]ok[/green]  " if c.ok else "[red]MISSING[/red]"
        render.console.print(f"{mark} {c.name}: {c.detail}", highlight=False)


def init(
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Act without asking.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Only report; exit 1 if anything is missing.")] = False,
    pool_size: Annotated[str | None, typer.Option(help="Size of a new loopback pool image, e.g. 50G.")] = None,
    instance: Annotated[int | None, typer.Option(help="Instance number.", min=0, max=99)] = None,
    config: Annotated[Path | None, typer.Option(help="Config file.")] = None,
) -> None:
    """Check this host and prepare it for den; safe to run again."""
    try:
        settings, _ = den_config.load({"instance": instance, "pool_size": pool_size}, config)
    except ValueError as exc:
        render.err_console.print(f"error: bad configuration: {exc}")
        raise typer.Exit(2) from None
    results = host_checks.run_checks(settings)
    _print_checks(results)
    missing = [c for c in results if not c.ok]
    if check:
        raise typer.Exit(1 if missing else 0)
    if os.geteuid() != 0:
        render.err_console.print("error: den init must run as root")
        raise typer.Exit(4)
    if missing and not yes:
        fixes = "\n".join(f"  - {c.fix}" for c in missing if c.fix)
        if not typer.confirm(f"den init will:\n{fixes}\nGo on?", default=True):
            raise typer.Exit(1)

    def say(msg: str) -> None:
        render.console.print(f"[cyan]->[/cyan] {msg}", highlight=False)

    try:
        asyncio.run(prepare.apply(settings, results, say))
    except DenError as exc:
        render.err_console.print(f"error: {exc.message}")
        raise typer.Exit(7) from None
    after = host_checks.run_checks(settings)
    still = [c for c in after if not c.ok]
    if still:
        _print_checks(still)
        render.err_console.print("error: some checks still fail (see above)")
        raise typer.Exit(1)
    render.console.print("[green]den init: this host is ready[/green]")
