"""``workspace.exec_stream`` as an MCP tool: output sent while the command runs,
the whole result at the end.

The command is started by den.services.execstream.open_exec, i.e. through
the registry (rights, validation, the checks of workspace.exec, audit). Each
chunk goes to the client as it comes: as a progress notification when the
request asked for progress (its ``progressToken``), else as a log message
(logger ``stdout`` or ``stderr``). The result keeps up to exec_max_output
bytes of each stream, like workspace.exec. A cancelled request kills it.
"""

from __future__ import annotations

import asyncio
import codecs
import signal as signals
from typing import TYPE_CHECKING, Any

import anyio
from mcp.server.context import ServerRequestContext
from mcp_types import LoggingLevel

from den.errors import InvalidParams
from den.rpc.registry import Caller
from den.services.execstream import open_exec

if TYPE_CHECKING:
    from den.app import App

STDIN_SCHEMA = {
    "type": "string",
    "default": "",
    "description": "Text given on standard input (then closed).",
}
DESCRIPTION = (
    "Run a command in a workspace and see its output while it runs: each chunk of "
    "stdout and stderr is sent as a progress notification (when the call asks for "
    "progress; stderr chunks begin with '[stderr] ') or else as a log message "
    "(logger stdout or stderr). The result at the end: exit_code, signal, timed_out, "
    "and stdout and stderr (up to exec_max_output bytes each; truncated says if cut). "
    "Cancelling the call kills the command. Same checks as workspace.exec."
)


def _signal_name(sig: int | None) -> str | None:
    if sig is None:
        return None
    try:
        return signals.Signals(sig).name.removeprefix("SIG")
    except ValueError:
        return str(sig)


async def exec_stream(
    app: App, caller: Caller, ctx: ServerRequestContext[Any, Any], args: dict[str, Any] | None
) -> dict[str, Any]:
    params = dict(args or {})
    stdin = params.pop("stdin", "")
    if not isinstance(stdin, str):
        raise InvalidParams("must be a string", field="stdin")
    progress = bool((ctx.meta or {}).get("progress_token"))
    limit = app.settings.exec_max_output
    kept = {1: bytearray(), 2: bytearray()}
    decoders = {c: codecs.getincrementaldecoder("utf-8")(errors="replace") for c in kept}
    truncated = False
    seen = 0
    run = await open_exec(app, caller, params)

    async def feed() -> None:
        if stdin:
            await run.write(stdin.encode())
        await run.close_stdin()

    feeder = asyncio.ensure_future(feed())
    try:
        while (chunk := await run.read()) is not None:
            channel, data = chunk
            room = max(limit - len(kept[channel]), 0)
            truncated = truncated or len(data) > room
            kept[channel] += data[:room]
            seen += len(data)
            text = decoders[channel].decode(data)
            if not text:
                continue
            name = "stdout" if channel == 1 else "stderr"
            if progress:
                message = text if channel == 1 else "[stderr] " + text
                await ctx.session.report_progress(seen, None, message)
            else:
                level: LoggingLevel = "info" if channel == 1 else "warning"
                await ctx.session.send_log_message(level, text, logger=name)
        end = await run.wait()
    finally:
        feeder.cancel()
        with anyio.CancelScope(shield=True):  # a cancelled call still kills and frees
            await asyncio.gather(feeder, return_exceptions=True)
            await run.close()
    return {
        "target": run.target,
        "exit_code": end.exit_code,
        "signal": _signal_name(end.signal),
        "timed_out": run.timed_out,
        "stdout": kept[1].decode(errors="replace"),
        "stderr": kept[2].decode(errors="replace"),
        "truncated": truncated,
    }
