"""A ``crun exec`` on a new terminal: the sandbox's ExecStream with a PTY.

The process is ``crun exec --detach`` with a console socket, under den's small
subreaper (den.ssh.reaper): the terminal's master comes back over the socket,
the exit status is the process's own (or the signal that killed it), and
signals go through pidfds only.
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
from pathlib import Path

from den.backends.base import ExecExit, Terminal
from den.backends.crun import Crun, pidfd_of_child, signal_child, signal_exec
from den.errors import BackendFailure

CHUNK = 1 << 16
DRAIN_SECONDS = 0.2  # output read after the process ended, while it keeps coming
FD_GRACE_SECONDS = 2.0  # for the master of a process that ended before it was read


def set_size(fd: int, cols: int, rows: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def receive_fd(listener: socket.socket) -> asyncio.Future[int]:
    """The one descriptor crun sends over its console socket."""
    from den.ssh.relay import receive_fd as receive

    return asyncio.ensure_future(receive(listener))


class PtyExec:
    """One process on a terminal (den.backends.base.ExecStream): all output on
    channel 1, writes are the terminal's input, :meth:`resize` sets its size."""

    def __init__(self, proc: asyncio.subprocess.Process, pidfd: int | None, pid_file: Path):
        self.proc = proc
        self.pidfd = pidfd
        self.pid_file = pid_file
        self.master: int | None = None
        self.exited: asyncio.Future[int] = asyncio.ensure_future(proc.wait())
        self._closed = False

    @classmethod
    async def start(
        cls,
        crun: Crun,
        cid: str,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        user: str,
        pid_file: Path,
        sock_dir: Path,
        spawn_env: dict[str, str],
        tty: Terminal,
    ) -> PtyExec:
        """Run ``argv`` in container ``cid`` on a new terminal; returns once its
        master is ours. BackendFailure (with crun's words) when it could not start."""
        from den.ssh import reaper

        sock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = sock_dir / f"c{secrets.token_hex(6)}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(path))
            listener.listen(1)
            cmd = crun.exec_argv(
                cid,
                argv,
                env={**env, "TERM": tty.term},
                cwd=cwd,
                user=user,
                pid_file=pid_file,
                console_socket=path,
                detach=True,
            )
            proc = await asyncio.create_subprocess_exec(
                *reaper.wrap(pid_file, cmd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=spawn_env,
            )
            self = cls(proc, pidfd_of_child(proc.pid), pid_file)
            got = receive_fd(listener)
            await asyncio.wait({got, self.exited}, return_when=asyncio.FIRST_COMPLETED)
            detail = ""
            if not got.done():
                # Either crun failed and says why, or the process ended at once
                # (``kill -HUP $$``) and its master, which crun sent before the
                # process ran, still waits in the listener.
                assert proc.stderr is not None
                with contextlib.suppress(TimeoutError):
                    said = await asyncio.wait_for(proc.stderr.read(), FD_GRACE_SECONDS)
                    detail = said.decode(errors="replace").strip()
                if not detail:
                    await asyncio.wait({got}, timeout=FD_GRACE_SECONDS)
            if not got.done():
                got.cancel()
                await self.close()
                raise BackendFailure(
                    f"could not start a terminal in the workspace: {detail[-300:]}"
                )
        finally:
            listener.close()
            path.unlink(missing_ok=True)
        self.master = got.result()
        os.set_blocking(self.master, False)
        set_size(self.master, tty.cols, tty.rows)
        return self

    async def _ready(self, writer: bool, timeout: float | None) -> bool:
        """Wait until the master is readable (writable); False on ``timeout`` or once
        the process ended (reading only)."""
        assert self.master is not None
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        add, remove = (
            (loop.add_writer, loop.remove_writer)
            if writer
            else (
                loop.add_reader,
                loop.remove_reader,
            )
        )
        # The descriptor as it is now: close() may run meanwhile (a cancelled read),
        # and the loop must stop watching this number before another file gets it.
        fd = self.master
        add(fd, ready)
        try:
            waiting: set[asyncio.Future[object]] = {fut}  # type: ignore[arg-type]
            if not writer and not self.exited.done():
                waiting.add(self.exited)  # type: ignore[arg-type]
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            remove(fd)
        return fut.done()

    async def read(self) -> tuple[int, bytes] | None:
        while self.master is not None:
            try:
                data = os.read(self.master, CHUNK)
            except BlockingIOError:
                ended = self.exited.done()
                if not await self._ready(False, DRAIN_SECONDS if ended else None) and ended:
                    return None  # ended, and silent: a background process holds the terminal
                continue
            except OSError:  # EIO: every process closed the terminal
                return None
            return (1, data) if data else None
        return None

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.master is not None:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                await self._ready(True, None)
            except OSError:
                return

    async def close_stdin(self) -> None:
        """A terminal has no end of input of its own (as OpenSSH's sshd: EOF is ignored)."""

    def resize(self, cols: int, rows: int) -> None:
        if self.master is not None:
            set_size(self.master, cols, rows)

    def signal(self, sig: int) -> None:
        """The reaper passes the signals it forwards on, holding them until crun's
        process is known; others go through pidfds only (:func:`signal_exec`)."""
        from den.ssh import reaper

        if self.pidfd is None or self.proc.returncode is not None:
            return
        if sig in reaper.FORWARDED or not self.pid_file.exists():
            signal_child(self.pidfd, sig)
        else:
            signal_exec(self.pid_file, self.proc.pid, self.pidfd, sig)

    async def wait(self) -> ExecExit:
        rc = await asyncio.shield(self.exited)
        if self.proc.stderr is not None:
            await self.proc.stderr.read()
        if rc < 0:
            return ExecExit(128 - rc, -rc)
        return ExecExit(rc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.returncode is None:
            self.signal(signal.SIGKILL)
        if self.master is not None:
            # Unwatched first: asyncio never watches a reused number it still holds.
            loop = asyncio.get_running_loop()
            loop.remove_reader(self.master)
            loop.remove_writer(self.master)
            os.close(self.master)
            self.master = None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.pid_file.unlink(missing_ok=True)
