"""Jobs: long work (an image build) run in the background, with progress.

A method that starts long work returns a job at once; ``job.get`` reports its
state, progress (``now`` of ``end``), current step and error. Jobs live in the
daemon's memory: a restart forgets them (and the work they did not finish is
undone at start by the owning service).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from den import tasks
from den.errors import Conflict, DenError, InvalidParams, NotFound
from den.rpc.registry import Caller, Cli, CliArg, Context, NoParams, Params, Right, method

log = logging.getLogger(__name__)
JobState = Literal["running", "done", "failed", "cancelled"]
KEEP_FINISHED = 200


class JobOut(BaseModel):
    id: str
    kind: str
    target: str
    owner: str
    state: JobState
    now: int
    end: int
    step: str
    error: str
    error_code: int | None
    result: dict[str, Any] | None
    started_at: datetime
    finished_at: datetime | None


@dataclass
class Job:
    id: str
    kind: str
    target: str
    owner: str
    state: JobState = "running"
    now: int = 0
    end: int = 0
    step: str = "starting"
    error: str = ""
    error_code: int | None = None
    result: dict[str, Any] | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def progress(self, now: int, end: int, step: str) -> None:
        self.now, self.end, self.step = now, end, step

    def out(self) -> JobOut:
        return JobOut(
            id=self.id,
            kind=self.kind,
            target=self.target,
            owner=self.owner,
            state=self.state,
            now=self.now,
            end=self.end,
            step=self.step,
            error=self.error,
            error_code=self.error_code,
            result=self.result,
            started_at=self.started_at,
            finished_at=self.finished_at,
        )


Work = Callable[[Job], Awaitable[BaseModel | None]]


def error_text(exc: DenError) -> str:
    if isinstance(exc, InvalidParams):
        return "; ".join(
            f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in exc.errors
        )
    return exc.message


class Jobs:
    """The daemon's jobs, newest last; finished ones are kept for a while."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}

    def start(self, kind: str, target: str, owner: str, work: Work) -> Job:
        job = Job(id=f"j{secrets.token_hex(5)}", kind=kind, target=target, owner=owner)
        self._jobs[job.id] = job
        job.task = tasks.spawn(self._run(job, work), name=f"job {job.id} {kind} {target}")
        self._forget_old()
        return job

    async def _run(self, job: Job, work: Work) -> None:
        ctx = {"job": job.id, "kind": job.kind, "target": job.target}
        try:
            result = await work(job)
        except DenError as exc:
            job.state, job.error, job.error_code = "failed", error_text(exc), exc.code
            log.warning("job failed: %s", job.error, extra={"ctx": ctx})
        except asyncio.CancelledError:
            job.state, job.error = "cancelled", "cancelled"
            log.info("job cancelled", extra={"ctx": ctx})
            raise
        except Exception:
            job.state, job.error, job.error_code = (
                "failed",
                "internal error; see the daemon log",
                -32603,
            )
            log.exception("job crashed", extra={"ctx": ctx})
        else:
            job.state = "done"
            job.result = result.model_dump(mode="json") if result is not None else None
            job.now = job.end = max(job.end, 1)
            log.info("job done", extra={"ctx": ctx})
        finally:
            job.finished_at = datetime.now(UTC)
            job.task = None

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def running(self, kind: str, target: str) -> Job | None:
        return next(
            (
                j
                for j in self._jobs.values()
                if j.kind == kind and j.target == target and j.state == "running"
            ),
            None,
        )

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state != "running"]
        for j in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[j.id]


JOBS = Jobs()


def _visible(caller: Caller, job: Job) -> bool:
    return caller.is_admin or job.owner == caller.name


class JobRef(Params):
    id: Annotated[str, CliArg()] = Field(pattern=r"^j[0-9a-f]{1,32}$", description="Job id.")


def _find(ctx: Context, job_id: str) -> Job:
    job = JOBS.get(job_id)
    if job is None or not _visible(ctx.caller, job):
        raise NotFound(f"no job {job_id!r}; `den job ls` lists jobs (a restart forgets them)")
    return job


@method("job.get", right=Right.read, cli=Cli("job show"))
async def job_get(ctx: Context, p: JobRef) -> JobOut:
    """Show a background job: state, progress (now of end), current step, error, result."""
    return _find(ctx, p.id).out()


@method(
    "job.list",
    right=Right.read,
    cli=Cli("job ls", columns=("id", "kind", "target", "state", "now", "end", "step", "error")),
)
async def job_list(ctx: Context, p: NoParams) -> list[JobOut]:
    """List background jobs since the daemon started: yours, or every one for an admin."""
    return [j.out() for j in JOBS.all() if _visible(ctx.caller, j)]


@method("job.cancel", right=Right.write, cli=Cli("job cancel"))
async def job_cancel(ctx: Context, p: JobRef) -> JobOut:
    """Stop a running job; what it made so far is removed."""
    job = _find(ctx, p.id)
    ctx.target = f"job:{job.id}"
    task = job.task
    if job.state != "running" or task is None:
        raise Conflict(f"job {job.id} is {job.state} already")
    task.cancel()
    await asyncio.wait([task], timeout=60)
    return job.out()
