"""A shell, a command or the sftp subsystem inside a workspace, over one channel.

The process is ``crun exec`` into the workspace's container: with a PTY its
terminal master comes back over a console socket (den.ssh.pty, shared with
the browser terminal) and is relayed to the channel (window changes become
TIOCSWINSZ); without one, stdin, stdout and stderr are three pipes kept apart.
crun runs detached under den's small subreaper (den.ssh.reaper), so the
channel ends as the process did: its exit status, or ``exit-signal`` when a
signal killed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh

from den import tasks
from den.backends.crun import pidfd_of_child, signal_child, signal_exec
from den.errors import DenError
from den.services.account import ROOT, login_account
from den.ssh import inside, pty, reaper, sftp, surface
from den.ssh.pty import SPAWN_ENV, Pty
from den.ssh.relay import FdReader, FdWriter
from den.ssh.target import Ready, as_root, ready

if TYPE_CHECKING:
    from den.ssh.link import Link

log = logging.getLogger(__name__)
_sessions = pty.SLOTS  # shared with the browser terminal (den.web.term)
DRAIN_SECONDS = 2.0
F_SETPIPE_SZ = 1031
__all__ = ["SPAWN_ENV", "WorkspaceSession"]


class WorkspaceSession(asyncssh.SSHServerSession[bytes]):
    def __init__(self, link: Link) -> None:
        self.link = link
        self.chan: asyncssh.SSHServerChannel[bytes] | None = None
        self.term: str | None = None
        self.size = (80, 24, 0, 0)
        self.master: int | None = None
        self.stdin: FdWriter | None = None
        self.readers: list[FdReader] = []
        self.pending: list[bytes] = []
        self.eof = False
        self.pid_file: Path | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.proc_fd: int | None = None  # pidfd of ``proc``, taken when it was spawned
        self.pty: Pty | None = None  # with a terminal, the process runs on this one
        self.ws: Ready | None = None
        self.closed = False
        self.slot: str | None = None  # the den user whose ssh_max_sessions this holds one of
        self.reaped = False  # runs under den.ssh.reaper, which forwards signals
        self._frozen_check = 0.0
        self._wake_later = False  # a check is due at the end of this second

    # -- asyncssh callbacks ----------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self.chan = chan

    def pty_requested(
        self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Mapping[int, int]
    ) -> bool:
        self.term = term_type or "xterm"
        self.size = term_size
        return True

    def shell_requested(self) -> bool:
        return self._start("shell", None)

    def exec_requested(self, command: str) -> bool:
        return self._start("exec", command)

    def subsystem_requested(self, subsystem: str) -> bool:
        return subsystem == "sftp" and self._start("sftp", None)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.link.count_in(len(data))
        if self.ws is not None:
            self.link.app.activity.touch(self.ws.ws_id, "ssh")
            self._wake()
        if self.stdin is not None:
            self.stdin.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.stdin is not None and self.master is None:
            self.stdin.close()
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self.size = (width, height, pixwidth, pixheight)
        if self.pty is not None:
            self.pty.resize(self.size)

    def signal_received(self, signal_name: str) -> None:
        sig = getattr(signal, f"SIG{signal_name.upper()}", None)
        if isinstance(sig, signal.Signals):
            self._kill(sig)

    def break_received(self, msec: int) -> bool:
        self._kill(signal.SIGINT)
        return True

    def pause_writing(self) -> None:
        for r in self.readers:
            r.pause()

    def resume_writing(self) -> None:
        for r in self.readers:
            r.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._kill(signal.SIGHUP)
        if self.stdin is not None and self.master is None:
            self.stdin.close()  # EOF: the sftp server, or a command reading stdin, ends
        for r in self.readers:
            r.close()

    # -- running -----------------------------------------------------------------
    def _start(self, kind: str, command: str | None) -> bool:
        # Each session keeps processes on the host (crun, its reaper) for as long
        # as its command runs, even after the client left: bounded per den user.
        user, limit = self.link.caller.name, self.link.app.settings.ssh_max_sessions
        if not _sessions.take(user, limit):
            self._say(
                f"den: busy: {limit} ssh sessions are running for {user} (ssh_max_sessions); "
                "end some (`den sessions`, `den kill`) and try again\n"
            )
            assert self.chan is not None
            self.chan.exit(1)
            return True
        self.slot = user
        self.link.session.opened(kind)
        tasks.spawn(self._run(kind, command), name=f"ssh-{kind}-{self.link.session.id}")
        return True

    async def _run(self, kind: str, command: str | None) -> None:
        assert self.chan is not None and self.link.ref is not None
        rc = 255
        try:
            self.ws = await ready(self.link.app, self.link.caller, self.link.ref)
            if self.closed:
                return
            busy = self.link.app.activity.busy(self.ws.ws_id, "ssh")
            with busy if kind != "shell" else contextlib.nullcontext():
                rc = await self._spawn(kind, command)
        except DenError as exc:
            self._say(f"den: {exc.message}\r\n" if self.term else f"den: {exc.message}\n")
            rc = 1
        except Exception:
            log.exception(
                "ssh %s session failed", kind, extra={"ctx": {"user": self.link.caller.name}}
            )
            self._say("den: internal error (see the daemon's log)\n")
        finally:
            if self.pid_file is not None:
                self.pid_file.unlink(missing_ok=True)
            if self.proc_fd is not None:
                os.close(self.proc_fd)
                self.proc_fd = None
            if self.slot is not None:
                _sessions.release(self.slot)
                self.slot = None
        if not self.closed:
            surface.send_exit(self.chan, rc)

    def _say(self, text: str) -> None:
        if self.chan is not None and not self.closed:
            self.chan.write_stderr(text.encode())

    async def _spawn(self, kind: str, command: str | None) -> int:
        assert self.ws is not None and self.chan is not None
        app = self.link.app
        backend = app.backend
        root = as_root(self.chan.get_extra_info("username") or "")
        acct = await login_account(app, self.ws.spec, ROOT if root else "")
        self.pid_file = pty.pid_file(app, self.ws.ws_id)
        if kind == "sftp":
            argv = await sftp.server_argv(app, self.ws, acct, self.pid_file)
            return await self._pipes(argv, stderr_to_log=True)
        args = [acct.shell, "-l"] if command is None else [acct.shell, "-c", command]
        env = self._env(acct)
        if self.link.agent is not None:  # ssh -A: the workspace's stable agent socket
            auth_sock = await self.link.agent.socket(self.ws, acct)
            if auth_sock is not None:
                env["SSH_AUTH_SOCK"] = auth_sock
        cid = backend.cid(self.ws.ws_id)
        if self.term is not None:
            return await self._pty(cid, args, env, acct)
        argv = backend.crun.exec_argv(
            cid, args, env=env, cwd=acct.home, user=acct.ids, pid_file=self.pid_file, detach=True
        )
        self.reaped = True
        return await self._pipes(reaper.wrap(self.pid_file, argv))

    def _env(self, acct: inside.Account) -> dict[str, str]:
        assert self.chan is not None
        env = pty.login_env(acct)
        allowed = self.link.app.settings.ssh_accept_env
        for k, v in self.chan.get_environment().items():
            if surface.accept_env(k, v, allowed):
                env[k] = v
        if self.term is not None:
            env["TERM"] = self.term
        (chost, cport), (shost, sport) = self.link.client, self.link.server
        env["SSH_CLIENT"] = f"{chost} {cport} {sport}"
        env["SSH_CONNECTION"] = f"{chost} {cport} {shost} {sport}"
        return env

    async def _pipes(self, argv: list[str], stderr_to_log: bool = False) -> int:
        assert self.chan is not None
        assert self.ws is not None
        chan, ws_id = self.chan, self.ws.ws_id
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = self.proc = await asyncio.create_subprocess_exec(
                *argv, stdin=in_r, stdout=out_w, stderr=err_w, env=SPAWN_ENV
            )
            self.proc_fd = pidfd_of_child(proc.pid)
            if self.closed:  # the client left while it was being started
                self._kill(signal.SIGHUP)
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        for fd in (in_w, out_r):  # fewer, larger hops for bulk data (sftp: 256 KiB packets)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
        err_text = bytearray()

        def out(data: bytes) -> None:
            self.link.count_out(len(data))
            self.link.app.activity.touch(ws_id, "ssh")
            if not self.closed:
                chan.write(data)

        def err(data: bytes) -> None:
            if stderr_to_log:
                err_text.extend(data[: 4096 - len(err_text)])
            else:
                self.link.count_out(len(data))
                if not self.closed:
                    chan.write_stderr(data)

        self.stdin = FdWriter(in_w, chan.pause_reading, chan.resume_reading)
        for data in self.pending:
            self.stdin.write(data)
        self.pending.clear()
        if self.eof:
            self.stdin.close()
        self.readers = [FdReader(out_r, out, lambda: None), FdReader(err_r, err, lambda: None)]
        try:
            rc = await proc.wait()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*(r.done.wait() for r in self.readers)), DRAIN_SECONDS
                )
        finally:
            for r in self.readers:
                r.close()
            self.stdin.close()
            self.stdin._finish()
            os.close(out_r)
            os.close(err_r)
        if err_text:
            log.info("sftp server said: %s", err_text.decode(errors="replace").strip()[:500])
        return rc

    async def _pty(
        self, cid: str, args: list[str], env: dict[str, str], acct: inside.Account
    ) -> int:
        assert self.chan is not None and self.ws is not None and self.pid_file is not None
        chan, ws_id = self.chan, self.ws.ws_id
        term = self.pty = Pty(self.link.app, self.pid_file)
        self.reaped = True
        if self.closed:  # the client left while it was being prepared
            term.kill(signal.SIGHUP)
        try:
            await term.start(cid, args, env, acct, self.size)
            self.master = term.master

            def out(data: bytes) -> None:
                self.link.count_out(len(data))
                self.link.app.activity.touch(ws_id, "ssh")
                if not self.closed:
                    chan.write(data)

            term.attach(out, chan.pause_reading, chan.resume_reading)
            assert term.stdin is not None and term.reader is not None
            self.stdin, self.readers = term.stdin, [term.reader]
            for data in self.pending:
                term.write(data)
            self.pending.clear()
            return await term.wait()
        finally:
            self.master = None
            term.close()

    def _kill(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process the channel runs: the one crun started
        (its pid file), else our own child (crun before it wrote the pid file,
        or den's sftp worker). Only through pidfds: a pid file outlives its
        process, and that pid may be someone else's by now (:func:`signal_exec`)."""
        if self.pty is not None:
            self.pty.kill(sig)
            return
        proc, fd = self.proc, self.proc_fd
        if proc is None or fd is None or proc.returncode is not None:
            return
        if self.reaped and sig in reaper.FORWARDED:
            # The reaper passes it on, holding it until crun's process is known:
            # none is lost between the spawn and the pid file.
            signal_child(fd, sig)
            return
        if self.pid_file is not None and self.pid_file.exists():
            signal_exec(self.pid_file, proc.pid, fd, sig)
        else:
            signal_child(fd, sig)

    def _wake(self) -> None:
        """A keystroke into a workspace the idle checker froze thaws it. The cgroup is
        read at most once a second; a keystroke in between is checked at the end of
        that second (the keystrokes right after a freeze must wake it too)."""
        assert self.ws is not None
        loop = asyncio.get_running_loop()
        wait = self._frozen_check + 1.0 - loop.time()
        if wait > 0:
            if not self._wake_later:
                self._wake_later = True
                loop.call_later(wait, self._wake_deferred)
            return
        self._frozen_check = loop.time()
        if self.link.ref is not None:
            pty.wake(self.link.app, self.link.caller, self.link.ref, self.ws.ws_id)

    def _wake_deferred(self) -> None:
        self._wake_later = False
        if not self.closed:
            self._wake()
