"""Whether a workspace runs: start, stop, restart, suspend, resume, and exec in it.

Every path that needs a running workspace goes through :func:`ensure_running`,
which resumes a suspended one transparently (and times it for /metrics).
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, Field
from sqlalchemy import update

from den.backends.base import ExecRequest, Spec
from den.db.models import User, Workspace
from den.errors import Conflict, QuotaExceeded
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services import account
from den.services.common import release_db
from den.services.workspaces import WorkspaceOut, WsRef, find_workspace, spec_of, ws_out_urls
from den.slots import UserSlots

if TYPE_CHECKING:
    from den.app import App


async def resume_now(ctx: Context, ws: Workspace, owner: User, cause: str) -> None:
    """Thaw a suspended workspace, timing it for /metrics."""
    start = time.perf_counter()
    async with ctx.app.ws_lock(ws.id):
        await release_db(ctx)
        spec = spec_of(ctx.app, ws, owner)
        ws.backend_state = await ctx.app.backend_for(spec).resume(
            spec, dict(ws.backend_state or {})
        )
        ws.state = "running"
        ws.state_reason = ""
        await ctx.db.commit()
    m = ctx.app.metrics
    m.resume_latency.labels(cause).observe(time.perf_counter() - start)
    m.transitions.labels("resume", cause).inc()
    ctx.app.activity.touch(ws.id, cause)


async def ensure_running(ctx: Context, ws: Workspace, owner: User, cause: str = "exec") -> None:
    """Resume a suspended workspace transparently; refuse a stopped one."""
    if ws.state == "running":
        return
    if ws.state == "suspended":
        await resume_now(ctx, ws, owner, cause)
        return
    raise Conflict(
        f"workspace {owner.name}/{ws.name} is {ws.state}; start it with `den start {ws.name}`"
    )


# -- methods ----------------------------------------------------------------------


async def _transition(
    ctx: Context,
    ref: str,
    verb: str,
    allowed: set[str],
    target_state: str,
    act: Callable[[Spec, dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
    force: bool = False,
) -> WorkspaceOut:
    ws, owner = await find_workspace(ctx, ref)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    async with ctx.app.ws_lock(ws.id):
        await ctx.db.refresh(ws)
        if ws.state == target_state and not force:
            return await ws_out_urls(ctx, ws, owner.name)
        if ws.state not in allowed:
            raise Conflict(f"cannot {verb} {owner.name}/{ws.name}: it is {ws.state}")
        spec = spec_of(ctx.app, ws, owner)
        state = dict(ws.backend_state or {})
        if act is not None:
            await release_db(ctx)
            state = await act(spec, state)
        ws.backend_state = state
        ws.state = target_state
        ws.state_reason = ""
        await ctx.db.commit()
    return await ws_out_urls(ctx, ws, owner.name)


def timed_act(
    ctx: Context, action: str, cause: str
) -> Callable[[Spec, dict[str, Any]], Awaitable[dict[str, Any]]]:
    """The backend's suspend or resume, counted and timed for /metrics."""
    hist = (
        ctx.app.metrics.suspend_latency if action == "suspend" else ctx.app.metrics.resume_latency
    )

    async def act(spec: Spec, state: dict[str, Any]) -> dict[str, Any]:
        backend = ctx.app.backend_for(spec)
        fn = backend.suspend if action == "suspend" else backend.resume
        start = time.perf_counter()
        out = await fn(spec, state)
        hist.labels(cause).observe(time.perf_counter() - start)
        ctx.app.metrics.transitions.labels(action, cause).inc()
        return out

    return act


@method("workspace.start", right=Right.write, cli=Cli("start"))
async def workspace_start(ctx: Context, p: WsRef) -> WorkspaceOut:
    """Start a stopped (or failed) workspace; resume a suspended one."""

    async def start(spec: Spec, state: dict[str, Any]) -> dict[str, Any]:
        return await ctx.app.backend_for(spec).start(spec, state)

    return await _transition(
        ctx, p.ref, "start", {"stopped", "failed", "suspended"}, "running", start
    )


@method("workspace.stop", right=Right.write, cli=Cli("stop"))
async def workspace_stop(ctx: Context, p: WsRef) -> WorkspaceOut:
    """Stop a workspace: every process ends, its files and address are kept."""

    async def stop(spec: Spec, state: dict[str, Any]) -> dict[str, Any]:
        return await ctx.app.backend_for(spec).stop(spec, state)

    return await _transition(
        ctx, p.ref, "stop", {"running", "suspended", "failed"}, "stopped", stop
    )


@method("workspace.restart", right=Right.write, cli=Cli("restart"))
async def workspace_restart(ctx: Context, p: WsRef) -> WorkspaceOut:
    """Stop the workspace if it runs, then start it again."""

    async def both(spec: Spec, state: dict[str, Any]) -> dict[str, Any]:
        b = ctx.app.backend_for(spec)
        return await b.start(spec, await b.stop(spec, state))

    return await _transition(
        ctx,
        p.ref,
        "restart",
        {"running", "stopped", "suspended", "failed"},
        "running",
        both,
        force=True,
    )


@method("workspace.suspend", right=Right.write, cli=Cli("suspend"))
async def workspace_suspend(ctx: Context, p: WsRef) -> WorkspaceOut:
    """Freeze a running workspace: memory kept, no CPU used until resumed."""
    return await _transition(
        ctx, p.ref, "suspend", {"running"}, "suspended", timed_act(ctx, "suspend", "rpc")
    )


@method("workspace.resume", right=Right.write, cli=Cli("resume"))
async def workspace_resume(ctx: Context, p: WsRef) -> WorkspaceOut:
    """Thaw a suspended workspace; its processes continue where they were."""
    return await _transition(
        ctx, p.ref, "resume", {"suspended"}, "running", timed_act(ctx, "resume", "rpc")
    )


class ExecParams(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    argv: Annotated[list[str], CliArg()] = Field(
        min_length=1, max_length=4096, description="Command and arguments (after --)."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    cwd: str = Field("", max_length=4096, description="Working directory (default: the home).")
    stdin: str = Field("", max_length=16 << 20, description="Text given on standard input.")
    timeout: float = Field(
        60.0, gt=0, le=86400, description="Seconds before the command is killed."
    )
    user: str = Field(
        "",
        max_length=64,
        description="User inside the workspace (default: the owner's account; root: root).",
    )


class ExecOut(BaseModel):
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool = Field(
        False, description="stdout or stderr was cut at the server's exec_max_output bytes."
    )


# workspace.exec calls running now, per member: each holds up to twice
# exec_max_output bytes in this process until it returns.
_running: weakref.WeakKeyDictionary[App, UserSlots] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def exec_slot(ctx: Context) -> Iterator[None]:
    """Count one exec of the caller for as long as it runs; refuse one past
    exec_max_concurrent. Admins are not counted: they set the limits."""
    if ctx.caller.is_admin:
        yield
        return
    running = _running.setdefault(ctx.app, UserSlots())
    who, limit = ctx.caller.name, ctx.app.settings.exec_max_concurrent
    if not running.take(who, limit):
        raise QuotaExceeded(
            f"busy: {limit} execs already running for {who} (exec_max_concurrent); "
            "wait for one to finish"
        )
    try:
        yield
    finally:
        running.release(who)


@method("workspace.exec", right=Right.write, cli=Cli("exec", exec_output=True))
async def workspace_exec(ctx: Context, p: ExecParams) -> ExecOut:
    """Run a command in a workspace and return its exit code and output.

    A suspended workspace is resumed first. Output past the server's
    exec_max_output bytes per stream is dropped and ``truncated`` is set
    (workspace.exec_stream and ssh stream any amount; the den command streams
    through workspace.exec_stream unless --json); a member runs at most
    exec_max_concurrent at once.
    """

    ws, owner = await find_workspace(ctx, p.ref)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    with exec_slot(ctx):
        await ensure_running(ctx, ws, owner)
        spec = spec_of(ctx.app, ws, owner)
        user = p.user or (await account.login_account(ctx.app, spec)).name
        req = ExecRequest(
            argv=p.argv,
            env=p.env,
            cwd=p.cwd,
            stdin=p.stdin.encode(),
            timeout=p.timeout,
            user=user,
            max_output=ctx.app.settings.exec_max_output,
        )
        await release_db(ctx)  # an exec may run for a day
        with ctx.app.activity.busy(ws.id, "exec"):
            res = await ctx.app.backend_for(spec).exec(spec, dict(ws.backend_state or {}), req)
    # A fresh short transaction, committed with the audit event by the registry.
    await ctx.db.execute(
        update(Workspace)
        .where(Workspace.id == ws.id)
        .values(last_activity_at=datetime.now(UTC), last_activity_kind="exec")
    )
    return ExecOut(
        exit_code=res.exit_code,
        stdout=res.stdout.decode(errors="replace"),
        stderr=res.stderr.decode(errors="replace"),
        timed_out=res.timed_out,
        truncated=res.truncated,
    )
