"""The den shell: ``ssh -p 2222 HOST`` (prompt ``den>``) and ``ssh HOST CMD``.

Its commands are the CLI generated from the method registry
(:mod:`den.cli.generate`), run in-process in a thread of their own with the SSH
user's identity: each call goes through ``REGISTRY.call`` on the daemon's
event loop, its output to this session's channel (:mod:`den.ssh.stdio`).

A command may wait for its user (``key add NAME -`` reads standard input, ``rm``
asks for confirmation), so no pool is shared between users: each user runs at
most ``MAX_PER_USER`` commands at once, and a command waiting more than
``INPUT_TIMEOUT`` seconds for input fails. Before each call the connection's
key and the user's role are read again: a removed key or a demotion counts
from the next call on, even inside a command that was already running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import shlex
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import asyncssh
import typer

from den import tasks
from den.cli.client import RpcError
from den.cli.generate import attach
from den.cli.spec import MethodSpec
from den.errors import DenError, Unauthenticated
from den.rpc.registry import REGISTRY
from den.slots import UserSlots
from den.ssh import stdio
from den.ssh.target import current_caller

if TYPE_CHECKING:
    from den.ssh.link import Link

log = logging.getLogger(__name__)
PROMPT = "den> "
EXIT_CODES = {-32001: 3, -32003: 4, -32006: 4, -32002: 5, -32004: 6, -32005: 7, -32602: 2}
ALIASES = {"ssh-key": "key", "list": "ls"}
QUIT = {"exit", "quit", "logout"}
MAX_PER_USER = 8  # commands one user runs at once, over all connections
INPUT_TIMEOUT = 60.0  # seconds a command waits for a line of input
_running = UserSlots()  # commands each user runs now, over all connections
_command: Any = None


class ShellState:
    """What a command running in a worker thread needs from its session."""

    def __init__(self, link: Link, loop: asyncio.AbstractEventLoop) -> None:
        self.link = link
        self.loop = loop
        self.pending: concurrent.futures.Future[Any] | None = None

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        link = self.link
        if link.revoked:
            raise Unauthenticated("this ssh connection was revoked")
        caller = await current_caller(link.app, link.caller.user_id, link.fingerprint)
        # The client's address: what `den ui allow --me` adds.
        link.caller = dataclasses.replace(caller, addr=link.client[0])
        return await REGISTRY.call(link.app, link.caller, method, params)

    def call(self, method: str, params: dict[str, Any]) -> Any:
        fut = asyncio.run_coroutine_threadsafe(self._call(method, params), self.loop)
        self.pending = fut
        try:
            return fut.result()
        except DenError as exc:
            _fail(str(RpcError(exc.code, exc.message, exc.data)), EXIT_CODES.get(exc.code, 1))
        except concurrent.futures.CancelledError:
            _fail("interrupted", 130)
        finally:
            self.pending = None


def _fail(message: str, code: int) -> NoReturn:
    from rich.text import Text

    from den.cli import render

    render.err_console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)
    raise typer.Exit(code)


def _invoke(ctx: typer.Context, m: MethodSpec, params: dict[str, Any]) -> Any:
    state = ctx.find_object(ShellState)
    assert state is not None
    return state.call(m.name, params)


def command() -> Any:
    """The click command of the den shell (built once: the registry is fixed)."""
    global _command
    if _command is None:
        stdio.install()
        app = typer.Typer(
            name="den",
            help="The den shell: the den CLI over ssh. `help CMD` explains CMD; `exit` leaves.",
            no_args_is_help=True,
            add_completion=False,
            pretty_exceptions_enable=False,
            rich_markup_mode=None,
        )
        attach(app, _invoke, local=False)
        _command = typer.main.get_command(app)
    return _command


def words(line: str) -> list[str]:
    argv = shlex.split(line)
    if argv and argv[0] == "help":
        argv = [*argv[1:], "--help"]
    return [ALIASES.get(a, a) if i < 2 else a for i, a in enumerate(argv)]


class DenShell(asyncssh.SSHServerSession[str]):
    def __init__(self, link: Link) -> None:
        self.link = link
        self.chan: asyncssh.SSHServerChannel[str] | None = None
        self.tty = False
        self.width = 0
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.cmd_input: queue.Queue[str | None] = queue.Queue()
        self.buf = ""
        self.running = False
        self.one_shot = False
        self.input_ended = False
        self.closed = False
        self.state: ShellState | None = None

    # -- asyncssh callbacks ------------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHServerChannel[str]) -> None:
        self.chan = chan

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Mapping[int, int]
    ) -> bool:
        self.tty = True
        self.width = term_size[0]
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self.width = width

    def shell_requested(self) -> bool:
        self.link.session.opened("den")
        tasks.spawn(self._interactive(), name=f"den-shell-{self.link.session.id}")
        return True

    def exec_requested(self, command: str) -> bool:
        self.one_shot = True  # all input is the command's standard input
        self.link.session.opened("den")
        tasks.spawn(self._one(command), name=f"den-exec-{self.link.session.id}")
        return True

    def data_received(self, data: str, datatype: asyncssh.DataType) -> None:
        self.link.count_in(len(data.encode()))
        self.buf += data
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self._line(line.rstrip("\r") + "\n")

    def _line(self, line: str | None) -> None:
        if line is None:
            self.input_ended = True
        if self.running or self.one_shot:
            self.cmd_input.put(line)
        else:
            self.lines.put_nowait(line)

    def soft_eof_received(self) -> None:
        self._line(None)

    def eof_received(self) -> bool:
        if self.buf:
            self._line(self.buf)
            self.buf = ""
        self._line(None)
        return True

    def break_received(self, msec: int) -> bool:
        if self.running and self.state is not None and self.state.pending is not None:
            self.state.pending.cancel()
        elif self.tty and self.chan is not None:
            self.chan.clear_input()  # type: ignore[attr-defined]
            self._write("^C\n" + PROMPT)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cmd_input.put(None)
        self.lines.put_nowait(None)

    # -- output -----------------------------------------------------------------------
    def _write(self, text: str) -> None:
        if self.chan is not None and not self.closed:
            self.link.count_out(len(text.encode()))
            self.chan.write(text)

    def _write_err(self, text: str) -> None:
        if self.chan is None or self.closed:
            return
        if self.tty:
            self._write(text)  # one terminal: the line editor keeps the prompt tidy
        else:
            self.link.count_out(len(text.encode()))
            self.chan.write_stderr(text)

    # -- running --------------------------------------------------------------------
    async def _interactive(self) -> None:
        c = self.link.caller
        self._write(f"den shell: {c.name} ({c.role}). `help` lists the commands, `exit` leaves.\n")
        while not self.closed:
            if self.tty:
                self._write(PROMPT)
            line = await self.lines.get()
            if line is None:
                break
            try:
                argv = words(line)
            except ValueError as exc:
                self._write_err(f"error: {exc}\n")
                continue
            if not argv:
                continue
            if argv[0] in QUIT:
                break
            await self.run(argv)
        self._exit(0)

    async def _one(self, line: str) -> None:
        try:
            argv = words(line)
        except ValueError as exc:
            self._write_err(f"error: {exc}\n")
            self._exit(2)
            return
        self._exit(await self.run(argv) if argv else 0)

    def _exit(self, code: int) -> None:
        if self.chan is not None and not self.closed:
            self.chan.exit(code)

    async def run(self, argv: list[str]) -> int:
        """Run one CLI command in a worker thread; return its exit code."""
        loop = asyncio.get_running_loop()
        state = self.state = ShellState(self.link, loop)

        def out(text: str) -> None:
            loop.call_soon_threadsafe(self._write, text)

        def err(text: str) -> None:
            loop.call_soon_threadsafe(self._write_err, text)

        def readline() -> str:
            try:
                line = self.cmd_input.get(timeout=INPUT_TIMEOUT)
            except queue.Empty:
                _fail(f"no input for {INPUT_TIMEOUT:.0f} s: the command was cancelled", 1)
            return line or ""

        user = self.link.caller.name
        if not _running.take(user, MAX_PER_USER):
            self._write_err(
                f"error: {user} runs {MAX_PER_USER} den shell commands already "
                "(the most at once); wait for one to end\n"
            )
            return EXIT_CODES[-32006]
        streams = stdio.make_streams(out, err, readline, self.tty, self.width)
        # A command may read the input that follows it (key add NAME -); what it
        # leaves unread goes back to be the next commands.
        while not self.lines.empty():
            self.cmd_input.put(self.lines.get_nowait())
        self.running = True
        try:
            return await _in_thread(lambda: self._run_sync(argv, streams, state))
        finally:
            _running.release(user)
            self.running = False
            # Lines typed ahead that the command did not read are the next commands.
            while not self.cmd_input.empty():
                self.lines.put_nowait(self.cmd_input.get_nowait())
            if self.input_ended:  # the command may have read the end of input: it is ours too
                self.lines.put_nowait(None)

    def _run_sync(self, argv: list[str], streams: stdio.Streams, state: ShellState) -> int:
        cmd = command()
        with stdio.bound(streams):
            try:
                cmd.main(
                    args=argv,
                    prog_name="den",
                    standalone_mode=True,
                    obj=state,
                    terminal_width=self.width or 100,
                )
            except SystemExit as exc:
                code = exc.code
                if code is None:
                    return 0
                if isinstance(code, int):
                    return code
                streams.stderr.write(f"{code}\n")
                return 1
            except Exception:
                log.exception("den shell command failed", extra={"ctx": {"argv": argv[:3]}})
                streams.stderr.write("error: internal error (see the daemon's log)\n")
                return 1
        return 0


def _in_thread(fn: Callable[[], int]) -> asyncio.Future[int]:
    """Run ``fn`` in a new thread (none is shared, so no user can use all of them up)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()

    def settle(code: int) -> None:
        if not fut.done():
            fut.set_result(code)

    def main() -> None:
        code = 1  # _run_sync catches what commands raise; anything else still ends the wait
        try:
            code = fn()
        finally:
            loop.call_soon_threadsafe(settle, code)

    threading.Thread(target=main, name="den-shell", daemon=True).start()
    return fut
