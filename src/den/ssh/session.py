"""A shell, a command or the sftp subsystem inside a workspace, over one channel.

The process is the workspace backend's ``exec_stream`` (den.backends.base):
with a PTY (den.ssh.pty, shared with the browser terminal) its output comes
on one stream and window changes resize it; without one, stdin, stdout and
stderr are kept apart; sftp is the backend's ``sftp``. The channel ends as
the process did: its exit status, or ``exit-signal`` when a signal killed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING

import asyncssh

from den import tasks
from den.backends.base import ExecRequest, ExecStream
from den.errors import DenError
from den.services.account import ROOT, login_account
from den.ssh import inside, pty, surface
from den.ssh.pty import SPAWN_ENV, Pty
from den.ssh.streams import StreamRelay
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
        self.relay: StreamRelay | None = None  # the running process's streams
        self.stream: ExecStream | None = None  # without a terminal, the process's
        self.pending: list[bytes] = []
        self.eof = False
        self.pty: Pty | None = None  # with a terminal, the process runs on this one
        self.ws: Ready | None = None
        self.closed = False
        self.slot: str | None = None  # the den user whose ssh_max_sessions this holds one of
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
        if self.relay is not None:
            self.relay.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.relay is not None and self.pty is None:
            self.relay.close_stdin()
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
        if self.relay is not None:
            self.relay.pause()

    def resume_writing(self) -> None:
        if self.relay is not None:
            self.relay.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._kill(signal.SIGHUP)
        if self.relay is not None and self.pty is None:
            self.relay.close_stdin()  # EOF: the sftp server, or a command reading stdin, ends

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
        ws = self.ws
        backend = app.backend_for(ws.spec)
        root = as_root(self.chan.get_extra_info("username") or "")
        acct = await login_account(app, ws.spec, ROOT if root else "")
        if kind == "sftp":
            stream = await backend.sftp(ws.spec, ws.state, acct.name)
            return await self._pipes(stream, stderr_to_log=True)
        args = [acct.shell, "-l"] if command is None else [acct.shell, "-c", command]
        env = self._env(acct)
        if self.link.agent is not None:  # ssh -A: the workspace's stable agent socket
            auth_sock = await self.link.agent.socket(ws, acct)
            if auth_sock is not None:
                env["SSH_AUTH_SOCK"] = auth_sock
        if self.term is not None:
            return await self._pty(args, env, acct)
        req = ExecRequest(argv=args, env=env, cwd=acct.home, user=acct.name)
        return await self._pipes(await backend.exec_stream(ws.spec, ws.state, req))

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

    async def _pipes(self, stream: ExecStream, stderr_to_log: bool = False) -> int:
        assert self.chan is not None
        assert self.ws is not None
        chan, ws_id = self.chan, self.ws.ws_id
        self.stream = stream
        err_text = bytearray()

        def out(ch: int, data: bytes) -> None:
            if ch == 1:
                self.link.count_out(len(data))
                self.link.app.activity.touch(ws_id, "ssh")
                if not self.closed:
                    chan.write(data)
            elif stderr_to_log:
                err_text.extend(data[: 4096 - len(err_text)])
            else:
                self.link.count_out(len(data))
                if not self.closed:
                    chan.write_stderr(data)

        try:
            if self.closed:  # the client left while it was being started
                stream.signal(signal.SIGHUP)
            relay = self.relay = StreamRelay(stream, out, chan.pause_reading, chan.resume_reading)
            for data in self.pending:
                relay.write(data)
            self.pending.clear()
            if self.eof or self.closed:
                relay.close_stdin()
            rc = await relay.wait(DRAIN_SECONDS)
        finally:
            if self.relay is not None:
                await self.relay.close()
            else:
                await stream.close()
        if err_text:
            log.info("sftp server said: %s", err_text.decode(errors="replace").strip()[:500])
        return rc

    async def _pty(self, args: list[str], env: dict[str, str], acct: inside.Account) -> int:
        assert self.chan is not None and self.ws is not None
        chan, ws_id = self.chan, self.ws.ws_id
        term = self.pty = Pty(self.link.app, self.ws)
        if self.closed:  # the client left while it was being prepared
            term.kill(signal.SIGHUP)
        try:
            await term.start(args, env, acct, self.size)

            def out(data: bytes) -> None:
                self.link.count_out(len(data))
                self.link.app.activity.touch(ws_id, "ssh")
                if not self.closed:
                    chan.write(data)

            term.attach(out, chan.pause_reading, chan.resume_reading)
            self.relay = term.stdin
            for data in self.pending:
                term.write(data)
            self.pending.clear()
            return await term.wait()
        finally:
            self.relay = None
            await term.close()

    def _kill(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process the channel runs (the backend's stream holds
        it until the process exists, and signals through pidfds only)."""
        if self.pty is not None:
            self.pty.kill(sig)
        elif self.stream is not None:
            self.stream.signal(sig)

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
            pty.wake(self.link.app, self.link.caller, self.link.ref, self.ws)

    def _wake_deferred(self) -> None:
        self._wake_later = False
        if not self.closed:
            self._wake()
