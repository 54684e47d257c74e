"""The crun OCI runtime, driven through its command line (one helper per verb)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from den import proc, tasks
from den.backends import cgroups
from den.backends.base import ExecExit
from den.errors import BackendFailure


@dataclass
class ExecOutcome:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool = False  # stdout or stderr had more than the call's cap


class _Capped:
    """What a pipe gave, up to ``cap`` bytes; the rest is read and dropped, so the
    command never blocks on a full pipe and the daemon never holds more than the cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.data = bytearray()
        self.dropped = 0

    async def collect(self, pipe: BinaryIO) -> None:
        """Read the pipe until EOF or cancelled."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 16)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while chunk := await reader.read(1 << 16):
                room = self.cap - len(self.data)
                if room > 0:
                    self.data += chunk[:room]
                self.dropped += max(0, len(chunk) - max(room, 0))
        finally:
            transport.close()


def pidfd_of_child(pid: int) -> int | None:
    """A pidfd of a child of ours, taken at once after spawning it (it cannot have been
    reaped yet, so the pid is still its own); None if it is already gone."""
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _exited(pidfd: int) -> bool:
    # A pidfd polls readable once its process has ended (reaped or not).
    return bool(select.select([pidfd], [], [], 0)[0])


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields and len(fields) > 1 else None


def signal_exec(pid_file: Path, crun_pid: int, crun_fd: int, sig: int) -> bool:
    """Send ``sig`` to the process a running ``crun exec`` (our child ``crun_pid``, whose
    pidfd is ``crun_fd``) started and wrote into ``pid_file``.

    A pid file outlives its process, and the number may by then be another process's,
    of this tenant or any other. So: a pidfd of the pid is opened first, then the pid
    must still be a child of that crun, and crun still alive (so its own pid was not
    reused either); only then the signal goes through the pidfd, which names the
    process that had the pid when it was opened: if that one has ended meanwhile,
    the signal goes nowhere (ESRCH). Returns whether it was sent.
    """
    try:
        pid = int(pid_file.read_text())
        fd = os.pidfd_open(pid)
    except (OSError, ValueError):
        return False
    try:
        if _parent(pid) != crun_pid or _exited(crun_fd):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def signal_child(pidfd: int | None, sig: int) -> bool:
    """Send ``sig`` to a child of ours through the pidfd taken when it was spawned."""
    if pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False


async def _feed(p: asyncio.subprocess.Process, data: bytes) -> None:
    assert p.stdin is not None
    try:
        if data:
            p.stdin.write(data)
            await p.stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the command did not read all of its input
    finally:
        p.stdin.close()


# How long a memfd handed to ``crun exec --process`` by path may stay open when
# crun never writes its pid file (it failed): long enough for a loaded host.
PROCESS_FD_TTL = 60.0


def process_spec(
    argv: list[str], *, env: dict[str, str], cwd: str, user: str, tty: bool
) -> dict[str, Any]:
    """The OCI process of an exec: what ``crun exec --cwd --user --env --tty`` would build."""
    uid, _, gid = user.partition(":")
    return {
        "args": argv,
        "env": [f"{k}={v}" for k, v in env.items()],
        "cwd": cwd,
        "user": {"uid": int(uid), "gid": int(gid or uid)},
        "terminal": tty,
    }


def process_memfd(argv: list[str], *, env: dict[str, str], cwd: str, user: str, tty: bool) -> int:
    """A memfd holding the process spec, at offset 0; the caller closes it.

    Anonymous memory, so the secrets in it never touch a disk, and no other
    host user can open it (``/proc/PID/fd`` needs ptrace rights on den).
    """
    data = json.dumps(process_spec(argv, env=env, cwd=cwd, user=user, tty=tty)).encode()
    fd = os.memfd_create("den-exec", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_when_started(fd: int, pid_file: Path) -> None:
    """Close ``fd`` once ``pid_file`` exists (crun read the spec before writing it),
    or after PROCESS_FD_TTL seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROCESS_FD_TTL

    def check() -> None:
        if pid_file.exists() or loop.time() >= deadline:
            os.close(fd)
        else:
            loop.call_later(0.1, check)

    loop.call_later(0.1, check)


class Crun:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _base(self) -> list[str]:
        return ["crun", "--root", str(self.root), "--cgroup-manager", "cgroupfs"]

    def init_pid(self, cid: str) -> int | None:
        """The host pid of the container's init while it runs, from crun's state file
        and /proc, without running crun."""
        found = self.init_process(cid)
        return None if found is None else found[0]

    def init_process(self, cid: str) -> tuple[int, int] | None:
        """(pid, start time in clock ticks) of the container's init while it runs."""
        try:
            status = json.loads((self.root / cid / "status").read_text())
            pid, started = int(status["pid"]), int(status["process-start-time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        fields = _stat(pid)
        # fields[0] is the state, fields[19] the start time: a reused pid is not ours.
        if not fields or len(fields) < 20 or fields[0] in ("Z", "X") or int(fields[19]) != started:
            return None
        return pid, started

    def quick_state(self, cid: str) -> str | None:
        """ "running" or "stopped" (crun knows it), or None (crun does not)."""
        if not (self.root / cid).exists():
            return None
        return "running" if self.init_pid(cid) is not None else "stopped"

    async def run(self, cid: str, bundle: Path) -> None:
        """Create and start the container detached; returns once init runs.

        The container's init inherits crun's standard streams, so they are
        /dev/null; crun's own errors go to a log file in the bundle.
        """
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        log = bundle / "crun.log"
        log.unlink(missing_ok=True)
        argv = [
            *self._base(),
            "--log",
            f"file:{log}",
            "run",
            "--detach",
            "--bundle",
            str(bundle),
            cid,
        ]
        p = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            rc = await asyncio.wait_for(p.wait(), 60)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            raise BackendFailure(f"crun did not start {cid} within 60 s") from None
        if rc != 0:
            detail = ""
            with contextlib.suppress(OSError):
                lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
                detail = lines[-1] if lines else ""
            if detail.startswith("{"):
                with contextlib.suppress(ValueError):
                    detail = str(json.loads(detail).get("msg", detail))
            raise BackendFailure(f"crun could not start the workspace: {detail or f'exit {rc}'}")

    async def update(
        self, cid: str, cpu_quota: int, cpu_period: int, memory: int, pids: int
    ) -> None:
        """Change the cgroup limits of a live container."""
        await proc.run(
            [
                *self._base(),
                "update",
                f"--cpu-period={cpu_period}",
                f"--cpu-quota={cpu_quota}",
                f"--memory={memory}",
                *([f"--memory-swap={memory}"] if cgroups.swap_accounted() else []),
                f"--pids-limit={pids}",
                cid,
            ]
        )

    async def kill(self, cid: str, sig: str = "TERM", all_processes: bool = False) -> None:
        argv = [*self._base(), "kill"]
        if all_processes:
            argv.append("--all")
        await proc.run([*argv, cid, sig], check=False)

    async def delete(self, cid: str) -> None:
        if (self.root / cid).exists():
            await proc.run([*self._base(), "delete", "--force", cid], check=False)

    def exec_argv(
        self,
        cid: str,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        user: str,
        pid_file: Path,
        console_socket: Path | None = None,
        detach: bool = False,
    ) -> list[str]:
        """The command line of ``crun exec`` for a caller that streams the process.

        With ``console_socket`` the process gets a terminal whose master crun
        sends over that unix socket (SCM_RIGHTS); without, it keeps the standard
        streams it is given. crun exits with the process's status (128+N when
        signal N killed it).

        The command, its environment and its user travel in a process spec that
        crun reads from a memfd of this daemon (``/proc/PID/fd/N``, which only
        root can open), never on the command line, where every host user sees
        them in ``ps``. The memfd is closed once crun has written ``pid_file``
        (it has read the spec by then), or after PROCESS_FD_TTL seconds.
        """
        fd = process_memfd(argv, env=env, cwd=cwd, user=user, tty=console_socket is not None)
        _close_when_started(fd, pid_file)
        cmd = [*self._base(), "exec", "--pid-file", str(pid_file)]
        if console_socket is not None:
            cmd += ["--console-socket", str(console_socket)]
        if detach:  # crun returns once the process runs (see den.ssh.reaper)
            cmd.append("--detach")
        return [*cmd, "--process", f"/proc/{os.getpid()}/fd/{fd}", cid]

    def ids(self, prefix: str) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and p.name.startswith(prefix)
        )

    async def exec(
        self,
        cid: str,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        user: str,
        stdin: bytes,
        timeout: float,
        pid_dir: Path,
        max_output: int,
    ) -> ExecOutcome:
        """Run ``argv`` in the container; on timeout kill it (not the container).

        At most ``max_output`` bytes of stdout and of stderr are kept; past that
        the output is read and dropped and the outcome says ``truncated``.
        """
        pid_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pid_file = pid_dir / f"exec-{os.getpid()}-{time.monotonic_ns()}.pid"
        # The spec (command, environment, user) goes through a memfd crun
        # inherits: nothing of it on the command line.
        spec_fd = process_memfd(argv, env=env, cwd=cwd, user=user, tty=False)
        cmd = [
            *self._base(),
            "exec",
            "--pid-file",
            str(pid_file),
            "--process",
            f"/proc/self/fd/{spec_fd}",
            cid,
        ]
        # Output through pipes of our own, not communicate(): a process the
        # command leaves in the background keeps them open, and the call must
        # still return when the command ends (or times out).
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        files = [os.fdopen(out_r, "rb", buffering=0), os.fdopen(err_r, "rb", buffering=0)]
        try:
            p = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=out_w, stderr=err_w, pass_fds=[spec_fd]
            )
        except FileNotFoundError:
            for f in files:
                f.close()
            raise BackendFailure("crun is not installed; run `den init`") from None
        finally:
            os.close(out_w)
            os.close(err_w)
            os.close(spec_fd)
        crun_fd = pidfd_of_child(p.pid)
        out, err = _Capped(max_output), _Capped(max_output)
        readers = [
            asyncio.ensure_future(out.collect(files[0])),
            asyncio.ensure_future(err.collect(files[1])),
        ]
        feeder = asyncio.ensure_future(_feed(p, stdin))
        timed_out = False
        try:
            try:
                await asyncio.wait_for(p.wait(), timeout)
            except TimeoutError:
                timed_out = True
                if crun_fd is not None:
                    signal_exec(pid_file, p.pid, crun_fd, signal.SIGKILL)
                try:
                    await asyncio.wait_for(p.wait(), 5)
                except TimeoutError:
                    signal_child(crun_fd, signal.SIGKILL)
                    await p.wait()
            # Take what is there; do not wait for background processes to end.
            await asyncio.wait(readers, timeout=0.2)
        finally:
            for task in (*readers, feeder):
                task.cancel()
            await asyncio.gather(*readers, feeder, return_exceptions=True)
            for f in files:
                f.close()
            if crun_fd is not None:
                os.close(crun_fd)
            pid_file.unlink(missing_ok=True)
        truncated = bool(out.dropped or err.dropped)
        stdout, stderr = bytes(out.data), bytes(err.data)
        rc = p.returncode if p.returncode is not None else -1
        if (rc != 0 and stderr.startswith(b"crun: ")) or b"\ncrun: " in stderr[-500:]:
            text = stderr.decode(errors="replace").strip().splitlines()[-1]
            if "executable file" in text or "No such file" in text:
                return ExecOutcome(127, stdout, stderr, timed_out, truncated)
        if rc == 255 and not stdout:
            # crun 1.8 reports a command it could not start with no "crun: "
            # prefix and exit 255: give the shell's codes instead.
            lines = stderr.decode(errors="replace").strip().splitlines()
            text = lines[-1] if lines else ""
            if text.startswith("executable file `") and text.endswith("No such file or directory"):
                return ExecOutcome(127, stdout, stderr, timed_out, truncated)
            if text.startswith("open executable: "):
                return ExecOutcome(126, stdout, stderr, timed_out, truncated)
        return ExecOutcome(124 if timed_out else rc, stdout, stderr, timed_out, truncated)


# After a streamed command ended, output still arriving within this long is
# passed on; then the streams count as ended even if a background process of
# the command keeps them open.
STREAM_DRAIN_SECONDS = 0.2
STREAM_CHUNK = 1 << 16
F_SETPIPE_SZ = 1031


class StreamedExec:
    """A ``crun exec`` whose streams are handed over as they come (den.backends.base.ExecStream).

    It runs under den's reaper (den.ssh.reaper), as an ssh session's command does:
    the reaper ends as the command ended, so a signal is told from an exit code.
    Each output pipe is read into a StreamReader of ``STREAM_CHUNK`` bytes, which
    stops reading the pipe when full: what the consumer does not take stays in
    the kernel's pipe, and the command waits. At most two chunks per stream are
    held here.
    """

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        pidfd: int | None,
        pid_file: Path,
        readers: dict[int, asyncio.StreamReader],
        transports: list[asyncio.BaseTransport],
        stdin: asyncio.StreamWriter,
        reaped: bool = True,
    ) -> None:
        self.proc = proc
        self.reaped = reaped  # under den's reaper (a crun exec); else a process of den's
        self.pidfd = pidfd
        self.pid_file = pid_file
        self._readers = readers
        self._transports = transports
        self._stdin = stdin
        self._pending: dict[int, asyncio.Future[bytes]] = {}
        self._exited: asyncio.Future[int] = asyncio.ensure_future(proc.wait())
        self._closed = False

    @classmethod
    async def start(
        cls, argv: list[str], pid_file: Path, env: dict[str, str], *, reaped: bool = True
    ) -> StreamedExec:
        """Spawn ``argv`` (a ``crun exec --detach`` command line) under the reaper;
        ``reaped`` False: ``argv`` is a host process of den's, spawned as is."""
        from den.ssh import reaper

        loop = asyncio.get_running_loop()
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            proc = await asyncio.create_subprocess_exec(
                *(reaper.wrap(pid_file, argv) if reaped else argv),
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                env=env,
            )
        except BaseException:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            raise
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        for fd in (in_w, out_r):  # fewer, larger hops for bulk data (sftp: 256 KiB packets)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
        pidfd = pidfd_of_child(proc.pid)
        readers: dict[int, asyncio.StreamReader] = {}
        transports: list[asyncio.BaseTransport] = []
        for channel, fd in ((1, out_r), (2, err_r)):
            reader = asyncio.StreamReader(limit=STREAM_CHUNK)
            t, _ = await loop.connect_read_pipe(
                lambda r=reader: asyncio.StreamReaderProtocol(r),  # type: ignore[misc]
                os.fdopen(fd, "rb", buffering=0),
            )
            readers[channel] = reader
            transports.append(t)
        wt, wp = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(in_w, "wb", buffering=0)
        )
        transports.append(wt)
        stdin = asyncio.StreamWriter(wt, wp, None, loop)
        return cls(proc, pidfd, pid_file, readers, transports, stdin, reaped)

    async def read(self) -> tuple[int, bytes] | None:
        while self._readers:
            for ch, reader in self._readers.items():
                if ch not in self._pending:
                    self._pending[ch] = asyncio.ensure_future(reader.read(STREAM_CHUNK))
            waiting: list[asyncio.Future[Any]] = list(self._pending.values())
            if self._exited.done():
                timeout: float | None = STREAM_DRAIN_SECONDS
            else:
                timeout = None
                waiting.append(self._exited)  # to start the drain timer when it ends
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:  # ended, and silent: background processes hold the pipes
                self._stop_reading()
                return None
            for ch, fut in list(self._pending.items()):
                if fut.done():
                    del self._pending[ch]
                    data = fut.result()
                    if data:
                        return ch, data
                    del self._readers[ch]
        return None

    def _stop_reading(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._readers.clear()

    async def write(self, data: bytes) -> None:
        if self._stdin.is_closing():
            return
        try:
            self._stdin.write(data)
            await self._stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            self._stdin.close()  # the command closed its stdin: the rest is dropped

    async def close_stdin(self) -> None:
        self._stdin.close()

    def signal(self, sig: int) -> None:
        """Through pidfds only (a pid file outlives its process: :func:`signal_exec`).
        The reaper forwards the usual signals, holding them until crun's process is
        known; the others (SIGKILL, SIGSTOP) go straight to that process."""
        from den.ssh import reaper

        if self.proc.returncode is not None or self.pidfd is None:
            return
        if sig in reaper.FORWARDED or not self.reaped:
            signal_child(self.pidfd, sig)
        elif not signal_exec(self.pid_file, self.proc.pid, self.pidfd, sig):
            tasks.spawn(self._signal_when_started(sig), name="exec signal")

    async def _signal_when_started(self, sig: int) -> bool:
        """Send ``sig`` to the command once crun has started it (its pid file is
        there); False if the reaper ended or 5 s passed first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while self.proc.returncode is None and self.pidfd is not None:
            if signal_exec(self.pid_file, self.proc.pid, self.pidfd, sig):
                return True
            if loop.time() > deadline:
                return False
            await asyncio.wait([self._exited], timeout=0.01)
        return False

    def resize(self, cols: int, rows: int) -> None:
        """No terminal: nothing to resize."""

    async def wait(self) -> ExecExit:
        rc = await asyncio.shield(self._exited)
        if rc < 0:
            return ExecExit(128 - rc, -rc)
        if rc != 0 and self.reaped and not self.pid_file.exists():
            # crun could not start the command (its message went to stderr).
            return ExecExit(127 if rc == 255 else rc)
        return ExecExit(rc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.proc.returncode is None and not self.reaped:
                signal_child(self.pidfd, signal.SIGKILL)
            elif self.proc.returncode is None:
                await self._signal_when_started(signal.SIGKILL)
                try:
                    await asyncio.wait_for(asyncio.shield(self._exited), 5)
                except TimeoutError:
                    signal_child(self.pidfd, signal.SIGKILL)
                    await self._exited
        finally:
            self._stop_reading()
            for t in self._transports:
                t.close()
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
            self.pid_file.unlink(missing_ok=True)
