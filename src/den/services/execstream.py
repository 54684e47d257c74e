"""Streaming exec: a command in a workspace whose output is handed over as it comes.

The method ``workspace.exec_stream`` is declared in the registry like any
other, so its right, its params schema, its audit event and its place in
``rpc.discover`` are declared once. It cannot return a stream over plain
JSON-RPC: transports that can (the websocket ``GET /v1/exec`` of
den.web.execws, den's MCP server) call :func:`open_exec`, which runs the
method through :meth:`Registry.call` (rights, validation, audit, metrics)
and takes the running command out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal as signals
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, Field
from sqlalchemy import update

from den.backends.base import ExecExit, ExecRequest, ExecStream
from den.db.models import Workspace
from den.errors import InvalidParams, InvalidRequest
from den.rpc.registry import REGISTRY, Caller, CliArg, Context, Params, Right, method
from den.services import account
from den.services.common import release_db
from den.services.power import ensure_running, exec_slot
from den.services.workspaces import find_workspace, spec_of

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
METHOD = "workspace.exec_stream"
WEBSOCKET_PATH = "/v1/exec"


class ExecStreamParams(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    argv: Annotated[list[str], CliArg()] = Field(
        min_length=1, max_length=4096, description="Command and arguments."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment variables.")
    cwd: str = Field("", max_length=4096, description="Working directory (default: the home).")
    user: str = Field(
        "",
        max_length=64,
        description="User inside the workspace (default: the owner's account; root: root).",
    )
    tty: bool = Field(False, description="A terminal (not offered yet: use `ssh -t`).")
    timeout: float = Field(
        0, ge=0, le=86400, description="Seconds before the command is killed (0: never)."
    )


class ExecStreamOut(BaseModel):
    target: str = Field(description="workspace:OWNER/NAME")


class RunningExec:
    """A streamed command and everything it holds (an exec slot of its caller, the
    workspace's busy mark), with the methods of den.backends.base.ExecStream.

    :meth:`close` kills the command if it still runs and gives everything back;
    the caller must call it whatever happens.
    """

    def __init__(self, app: App, ws_id: str, target: str, stream: ExecStream, timeout: float):
        self.app = app
        self.ws_id = ws_id
        self.target = target
        self.stream = stream
        self.held = contextlib.ExitStack()  # the slot and the busy mark, given back by close
        self.timed_out = False
        self.started = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        if timeout:
            self._timer = asyncio.get_running_loop().call_later(timeout, self._time_out)

    def _time_out(self) -> None:
        self.timed_out = True
        self.stream.signal(signals.SIGKILL)

    async def read(self) -> tuple[int, bytes] | None:
        chunk = await self.stream.read()
        if chunk is not None:
            self.app.activity.touch(self.ws_id, "exec")
        return chunk

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def close_stdin(self) -> None:
        await self.stream.close_stdin()

    def signal(self, sig: int) -> None:
        self.stream.signal(sig)

    async def wait(self) -> ExecExit:
        return await self.stream.wait()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            await self.stream.close()
        finally:
            self.held.close()
            if self.ws_id:
                await self._touch()
            self.ws_id = ""

    async def _touch(self) -> None:
        with contextlib.suppress(Exception):  # a database hiccup must not hide the exit
            async with self.app.sessions() as db:
                await db.execute(
                    update(Workspace)
                    .where(Workspace.id == self.ws_id)
                    .values(last_activity_at=datetime.now(UTC), last_activity_kind="exec")
                )
                await db.commit()


# Set by open_exec for the one call it makes: where the method leaves the command.
_opening: contextvars.ContextVar[list[RunningExec] | None] = contextvars.ContextVar(
    "den_exec_opening", default=None
)


async def open_exec(app: App, caller: Caller, params: dict[str, Any]) -> RunningExec:
    """Start a streamed command for ``caller``: ``workspace.exec_stream`` run through the
    registry (rights, params, the checks of workspace.exec, the audit event), its
    command handed back running. Raises den.errors.DenError as the method would."""
    out: list[RunningExec] = []
    token = _opening.set(out)
    try:
        await REGISTRY.call(app, caller, METHOD, params)
    except BaseException:
        for running in out:  # started, then the call failed after (its commit)
            await running.close()
        raise
    finally:
        _opening.reset(token)
    return out[0]


@method(METHOD, right=Right.write)
async def workspace_exec_stream(ctx: Context, p: ExecStreamParams) -> ExecStreamOut:
    """Run a command in a workspace, its output streamed as it comes (a websocket).

    Not callable as plain JSON-RPC: open a websocket to ``GET /v1/exec`` on
    den's HTTP listener or its unix socket, authenticated as ``/rpc`` is (a
    bearer token, or the socket's peer). Framing: the client's first frame is
    text, these params as a JSON object. Then binary frames carry bytes with a
    1-byte channel prefix (0 stdin from the client; 1 stdout, 2 stderr from
    den), and text frames carry JSON control: from the client
    ``{"eof": true}`` (end of stdin) and ``{"signal": "INT"}`` (TERM, HUP,
    KILL, ...); den's last frame is ``{"exit_code": N, "signal": null|"KILL",
    "timed_out": false}`` (N is 128+S when signal S ended it), or
    ``{"error": {code, message, data}}`` as JSON-RPC errors are. Closing the
    websocket kills the command. Output is read only as fast as the client
    reads it. Same checks as workspace.exec (a suspended workspace is
    resumed; at most exec_max_concurrent per member).
    """
    opening = _opening.get()
    if opening is None:
        raise InvalidRequest(
            f"{METHOD} streams: open a websocket to {WEBSOCKET_PATH} (see its description "
            "in rpc.discover), or call workspace.exec for the whole output at the end"
        )
    ws, owner = await find_workspace(ctx, p.ref)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    held = contextlib.ExitStack()
    try:
        if p.tty:
            raise InvalidParams(
                "a terminal is not offered by streaming exec; use `ssh -t` for one", field="tty"
            )
        held.enter_context(exec_slot(ctx))
        await ensure_running(ctx, ws, owner)
        spec = spec_of(ctx.app, ws, owner)
        user = p.user or (await account.login_account(ctx.app, spec)).name
        req = ExecRequest(argv=p.argv, env=p.env, cwd=p.cwd, user=user)
        state = dict(ws.backend_state or {})
        await release_db(ctx)  # it may run for a day
        held.enter_context(ctx.app.activity.busy(ws.id, "exec"))
        stream = await ctx.app.backend_for(spec).exec_stream(spec, state, req)
    except BaseException:
        held.close()
        raise
    running = RunningExec(ctx.app, ws.id, ctx.target, stream, p.timeout)
    running.held = held
    opening.append(running)
    return ExecStreamOut(target=ctx.target)
