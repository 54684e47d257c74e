"""A login shell (or a command) on a terminal inside a workspace: the one way
both SSH sessions and the browser terminal (den.web.term) run one.

The process is ``crun exec --detach`` with a console socket, under den's small
subreaper (den.ssh.reaper): the terminal's master comes back over the socket,
the exit status is the process's own (or the signal that killed it), and
signals go through pidfds only. Whoever runs one also holds one of the den
user's ``ssh_max_sessions`` slots (:data:`SLOTS`) while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import signal
import socket
import struct
import termios
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from den import tasks
from den.backends import cgroups
from den.backends.bundle import PATH
from den.backends.crun import pidfd_of_child, signal_child, signal_exec
from den.errors import BackendFailure
from den.slots import UserSlots
from den.ssh import reaper
from den.ssh.relay import FdReader, FdWriter, receive_fd
from den.ssh.target import ready

if TYPE_CHECKING:
    from den.app import App
    from den.rpc.registry import Caller
    from den.ssh import inside

SLOTS = UserSlots()  # shell, exec, sftp and browser-terminal sessions each den user runs now
# crun and den's helpers get none of the daemon's environment.
SPAWN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
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


def pid_file(app: App, ws_id: str) -> Path:
    """A fresh name for the pid file of one session's process in the workspace's bundle."""
    return app.backend.bundle(ws_id) / f"ssh-{secrets.token_hex(6)}.pid"


def wake(app: App, caller: Caller, ref: str, ws_id: str) -> None:
    """A keystroke into a workspace the idle checker froze thaws it (resumed as a
    session's start would: den.ssh.target.ready)."""
    if cgroups.is_frozen(app.backend.cgroup(ws_id)):
        tasks.spawn(ready(app, caller, ref), name=f"ssh-wake-{ws_id}")


def set_size(fd: int, size: Size) -> None:
    width, height, pw, ph = size
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pw, ph))


class Pty:
    """One process on a terminal: :meth:`start`, :meth:`attach` a consumer of its
    output, :meth:`wait` for its status, :meth:`close` in the end."""

    def __init__(self, app: App, pid_file: Path) -> None:
        self.app = app
        self.pid_file = pid_file
        self.proc: asyncio.subprocess.Process | None = None
        self.proc_fd: int | None = None  # pidfd of ``proc``, taken when it was spawned
        self.master: int | None = None
        self.stdin: FdWriter | None = None
        self.reader: FdReader | None = None
        self._early: list[signal.Signals] = []  # asked for before the process existed
        self._exited: asyncio.Future[int] | None = None

    async def start(
        self, cid: str, args: list[str], env: dict[str, str], acct: inside.Account, size: Size
    ) -> None:
        """Run ``args`` in container ``cid`` as ``acct`` on a new terminal of ``size``;
        returns once the terminal's master is ours. Raises BackendFailure (with
        crun's words) when it could not start."""
        sock_dir = Path(f"/run/den/ssh{self.app.settings.instance}")
        sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = sock_dir / f"c{secrets.token_hex(6)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(path))
            listener.listen(1)
            argv = self.app.backend.crun.exec_argv(
                cid,
                args,
                env=env,
                cwd=acct.home,
                user=acct.ids,
                pid_file=self.pid_file,
                console_socket=path,
                detach=True,
            )
            proc = self.proc = await asyncio.create_subprocess_exec(
                *reaper.wrap(self.pid_file, argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=SPAWN_ENV,
            )
            self.proc_fd = pidfd_of_child(proc.pid)
            for sig in self._early:  # e.g. the client left while it was being started
                self.kill(sig)
            self._early.clear()
            got = asyncio.ensure_future(receive_fd(listener))
            self._exited = asyncio.ensure_future(proc.wait())
            await asyncio.wait({got, self._exited}, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                assert proc.stderr is not None
                detail = (await proc.stderr.read()).decode(errors="replace").strip()
                raise BackendFailure(
                    f"could not start a terminal in the workspace: {detail[-300:]}"
                )
        finally:
            listener.close()
            path.unlink(missing_ok=True)
        self.master = got.result()
        set_size(self.master, size)

    def attach(
        self,
        out: Callable[[bytes], None],
        on_full: Callable[[], None] = lambda: None,
        on_drained: Callable[[], None] = lambda: None,
    ) -> None:
        """Relay the terminal: its output to ``out``; :meth:`write` feeds it (``on_full``
        and ``on_drained`` tell when its input backs up and drains)."""
        assert self.master is not None
        self.stdin = FdWriter(self.master, on_full, on_drained, close_fd=False)
        self.reader = FdReader(self.master, out, lambda: None)

    def write(self, data: bytes) -> None:
        if self.stdin is not None:
            self.stdin.write(data)

    def resize(self, size: Size) -> None:
        if self.master is not None:
            set_size(self.master, size)

    def pause(self) -> None:
        if self.reader is not None:
            self.reader.pause()

    def resume(self) -> None:
        if self.reader is not None:
            self.reader.resume()

    async def wait(self) -> int:
        """The process's status once it ended and its last output was read: its
        exit code, or -N when signal N killed it."""
        assert self._exited is not None and self.proc is not None
        assert self.reader is not None and self.stdin is not None
        rc = await self._exited
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.reader.done.wait(), 0.2)
        self.reader.close()
        self.stdin._finish()
        assert self.proc.stderr is not None
        await self.proc.stderr.read()
        return rc

    def kill(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process crun started. The reaper passes the signals it
        forwards on, holding them until crun's process is known: none is lost
        between the spawn and the pid file. Others go through pidfds only: a pid
        file outlives its process, and that pid may be someone else's by now
        (:func:`signal_exec`)."""
        proc, fd = self.proc, self.proc_fd
        if proc is None:
            self._early.append(sig)
            return
        if fd is None or proc.returncode is not None:
            return
        if sig in reaper.FORWARDED:
            signal_child(fd, sig)
        elif self.pid_file.exists():
            signal_exec(self.pid_file, proc.pid, fd, sig)
        else:
            signal_child(fd, sig)

    def close(self) -> None:
        """Let go of the terminal and the process (after :meth:`wait`, or when
        :meth:`start` failed)."""
        if self.reader is not None:
            self.reader.close()
        if self.master is not None:
            os.close(self.master)
            self.master = None
        if self.proc_fd is not None:
            os.close(self.proc_fd)
            self.proc_fd = None
        self.pid_file.unlink(missing_ok=True)
