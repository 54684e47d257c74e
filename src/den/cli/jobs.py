"""Following a background job from the CLI with a Rich progress bar.

A method whose :class:`den.rpc.registry.Cli` has ``follow_job`` returns a job;
the generated command hands it to :func:`follow`, which polls ``job.get`` until
the job ends, then returns its result or exits non-zero with its error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from den.cli import render
from den.cli.spec import MethodSpec

POLL_SECONDS = 0.3


class Bar:
    """One progress bar on stderr: ``update(now, end, step)`` as work goes on."""

    def __init__(self, title: str, *, quiet: bool = False) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[step]}", markup=False),
            console=render.err_console,
            disable=quiet,
            transient=False,
        )
        self.task: TaskID = self.progress.add_task(title, total=None, step="")
        # Not a terminal (a log, CI): a bar is drawn only at the end, so each new
        # kind of step is printed as a line instead (not one per package).
        self.lines = not quiet and not render.err_console.is_terminal
        self.title = title
        self.last = ""

    def update(self, now: int, end: int, step: str) -> None:
        self.progress.update(self.task, completed=now, total=end or None, step=step[:60])
        kind = step.partition(" ")[0]
        if self.lines and step and kind != self.last.partition(" ")[0]:
            self.last = step
            pct = f"{100 * now // end}% " if end else ""
            render.err_console.print(
                f"{self.title}: {pct}{step}", markup=False, highlight=False, soft_wrap=True
            )

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()


def _exit_code(code: Any) -> int:
    from den.cli.main import EXIT_CODES

    return EXIT_CODES.get(code, 1) if isinstance(code, int) else 1


def follow(
    ctx: typer.Context,
    invoke: Callable[[typer.Context, MethodSpec, dict[str, Any]], Any],
    job: Any,
    *,
    quiet: bool = False,
) -> Any:
    """Poll ``job`` to its end; return its result, or print its error and exit non-zero."""
    if not isinstance(job, dict) or "id" not in job:
        return job
    get = MethodSpec.named("job.get")
    title = f"{job.get('kind', 'job')} {job.get('target', '')}".strip()
    try:
        with Bar(title, quiet=quiet) as bar:
            while job.get("state") == "running":
                bar.update(job.get("now", 0), job.get("end", 0), job.get("step", ""))
                time.sleep(POLL_SECONDS)
                job = invoke(ctx, get, {"id": job["id"]})
            bar.update(job.get("now", 0), job.get("end", 0), job.get("state", ""))
    except KeyboardInterrupt:
        render.err_console.print(
            f"stopped following; job {job['id']} goes on in the daemon "
            f"(`den job show {job['id']}`, `den job cancel {job['id']}`)",
            highlight=False,
        )
        raise typer.Exit(130) from None
    if job.get("state") != "done":
        error = escape(str(job.get("error", "")))
        render.err_console.print(
            f"[red]error:[/red] {escape(title)} {job.get('state')}: {error}", highlight=False
        )
        raise typer.Exit(_exit_code(job.get("error_code")))
    return job.get("result") if job.get("result") is not None else job
