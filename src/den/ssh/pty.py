"""A login shell (or a command) on a terminal inside a workspace: the one way
both SSH sessions and the browser terminal (den.web.term) run one.

The process is the workspace backend's ``exec_stream`` with a Terminal
(den.backends.base): its output, input, size, signals and exit status go
through that stream. Whoever runs one also holds one of the den user's
``ssh_max_sessions`` slots (:data:`SLOTS`) while it runs.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from den import tasks
from den.backends.base import PATH, ExecRequest, ExecStream, Terminal
from den.slots import UserSlots
from den.ssh.streams import StreamRelay
from den.ssh.target import Ready, ready

if TYPE_CHECKING:
    from den.app import App
    from den.rpc.registry import Caller
    from den.ssh import inside

SLOTS = UserSlots()  # shell, exec, sftp and browser-terminal sessions each den user runs now
# crun and den's helpers get none of the daemon's environment.
SPAWN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
DRAIN_SECONDS = 0.2  # output still read after the process ended
Size = tuple[int, int, int, int]  # columns, rows, pixel width, pixel height


def login_env(acct: inside.Account) -> dict[str, str]:
    """The environment a login in the workspace starts with."""
    return {
        "PATH": PATH,
        "HOME": acct.home,
        "USER": acct.name,
        "LOGNAME": acct.name,
        "SHELL": acct.shell,
        "LANG": "C.UTF-8",
    }


def wake(app: App, caller: Caller, ref: str, ws: Ready) -> None:
    """A keystroke into a workspace the idle checker froze thaws it (resumed as a
    session's start would: den.ssh.target.ready)."""
    tasks.spawn(_wake(app, caller, ref, ws), name=f"ssh-wake-{ws.ws_id}")


async def _wake(app: App, caller: Caller, ref: str, ws: Ready) -> None:
    if await app.backend_for(ws.spec).status(ws.spec, ws.state) == "suspended":
        await ready(app, caller, ref)


class Pty:
    """One process on a terminal inside a workspace (any backend's exec_stream with a
    Terminal): :meth:`start`, :meth:`attach` a consumer of its output, :meth:`wait`
    for its status, :meth:`close` in the end."""

    def __init__(self, app: App, ws: Ready) -> None:
        self.app = app
        self.ws = ws
        self.stream: ExecStream | None = None
        self.stdin: StreamRelay | None = None  # set by attach
        self._early: list[signal.Signals] = []  # asked for before the process existed

    async def start(
        self, args: list[str], env: dict[str, str], acct: inside.Account, size: Size
    ) -> None:
        """Run ``args`` as ``acct`` on a new terminal of ``size``. Raises
        BackendFailure (with the backend's words) when it could not start."""
        spec = self.ws.spec
        req = ExecRequest(argv=args, env=env, cwd=acct.home, user=acct.name)
        tty = Terminal(env.get("TERM", "xterm"), size[0], size[1])
        stream = self.stream = await self.app.backend_for(spec).exec_stream(
            spec, self.ws.state, req, tty=tty
        )
        for sig in self._early:  # e.g. the client left while it was being started
            stream.signal(sig)
        self._early.clear()

    def attach(
        self,
        out: Callable[[bytes], None],
        on_full: Callable[[], None] = lambda: None,
        on_drained: Callable[[], None] = lambda: None,
    ) -> None:
        """Relay the terminal: its output to ``out``; :meth:`write` feeds it (``on_full``
        and ``on_drained`` tell when its input backs up and drains)."""
        assert self.stream is not None
        self.stdin = StreamRelay(self.stream, lambda _ch, data: out(data), on_full, on_drained)

    def write(self, data: bytes) -> None:
        if self.stdin is not None:
            self.stdin.write(data)

    def resize(self, size: Size) -> None:
        if self.stream is not None:
            self.stream.resize(size[0], size[1])

    def pause(self) -> None:
        if self.stdin is not None:
            self.stdin.pause()

    def resume(self) -> None:
        if self.stdin is not None:
            self.stdin.resume()

    async def wait(self) -> int:
        """The process's status once it ended and its last output was read: its
        exit code, or -N when signal N killed it."""
        assert self.stdin is not None
        return await self.stdin.wait(DRAIN_SECONDS)

    def kill(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process (held until it exists: none is lost)."""
        if self.stream is None:
            self._early.append(sig)
        else:
            self.stream.signal(sig)

    async def close(self) -> None:
        """Let go of the terminal and the process (after :meth:`wait`, or when
        :meth:`start` failed)."""
        if self.stdin is not None:
            await self.stdin.close()
        elif self.stream is not None:
            await self.stream.close()
