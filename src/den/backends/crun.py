"""The crun OCI runtime, driven through its command line (one helper per verb)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from den import proc
from den.errors import BackendFailure


@dataclass
class ExecOutcome:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool


MAX_OUTPUT = 16 << 20


async def _collect(pipe: BinaryIO, buf: bytearray) -> None:
    """Read a pipe into ``buf`` (at most MAX_OUTPUT bytes kept) until EOF or cancelled."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while chunk := await reader.read(1 << 16):
            if len(buf) < MAX_OUTPUT:
                buf += chunk[: MAX_OUTPUT - len(buf)]
    finally:
        transport.close()


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
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        # fields[0] is the state, fields[19] the start time: a reused pid is not ours.
        if fields[0] in ("Z", "X") or int(fields[19]) != started:
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
    ) -> ExecOutcome:
        """Run ``argv`` in the container; on timeout kill it (not the container)."""
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
        out_buf, err_buf = bytearray(), bytearray()
        readers = [
            asyncio.ensure_future(_collect(files[0], out_buf)),
            asyncio.ensure_future(_collect(files[1], err_buf)),
        ]
        feeder = asyncio.ensure_future(_feed(p, stdin))
        timed_out = False
        try:
            try:
                await asyncio.wait_for(p.wait(), timeout)
            except TimeoutError:
                timed_out = True
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                try:
                    await asyncio.wait_for(p.wait(), 5)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    await p.wait()
            # Take what is there; do not wait for background processes to end.
            await asyncio.wait(readers, timeout=0.2)
        finally:
            for task in (*readers, feeder):
                task.cancel()
            await asyncio.gather(*readers, feeder, return_exceptions=True)
            for f in files:
                f.close()
            pid_file.unlink(missing_ok=True)
        out, err = bytes(out_buf), bytes(err_buf)
        rc = p.returncode if p.returncode is not None else -1
        if (rc != 0 and err.startswith(b"crun: ")) or b"\ncrun: " in err[-500:]:
            text = err.decode(errors="replace").strip().splitlines()[-1]
            if "executable file" in text or "No such file" in text:
                return ExecOutcome(127, out[:MAX_OUTPUT], err[:MAX_OUTPUT], timed_out)
        if rc == 255 and not out:
            # crun 1.8 reports a command it could not start with no "crun: "
            # prefix and exit 255: give the shell's codes instead.
            lines = err.decode(errors="replace").strip().splitlines()
            text = lines[-1] if lines else ""
            if text.startswith("executable file `") and text.endswith("No such file or directory"):
                return ExecOutcome(127, out, err[:MAX_OUTPUT], timed_out)
            if text.startswith("open executable: "):
                return ExecOutcome(126, out, err[:MAX_OUTPUT], timed_out)
        return ExecOutcome(124 if timed_out else rc, out[:MAX_OUTPUT], err[:MAX_OUTPUT], timed_out)
