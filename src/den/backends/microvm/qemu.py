"""QEMU and virtiofsd processes of one microVM, and its QMP monitor.

Every process is started through a gate (``sh -c 'read _; exec "$@"'``): den
moves the gate into the workspace's cgroup, then lets it exec the real
program, so nothing runs a single instruction outside the cgroup (Python's
``preexec_fn`` would do the same but is unsafe in a threaded daemon). QEMU
runs ``-daemonize``: its first process exits once the machine is set up (the
QMP and agent sockets listen), and the VM itself is nobody's child, so it
outlives a ``kill -9`` of the daemon; a new daemon finds it by its pid file
and its sockets in the VM directory.

virtiofsd (QEMU's C one, Debian 12) runs as root, which its design needs to
serve files of any owner, and is hardened by its own options:

* ``-o sandbox=namespace`` (its default, made explicit): new mount, pid and
  net namespaces, ``pivot_root`` into the shared tree, so no path the guest
  sends (``..``, symlinks, races) resolves outside the snapshot; its own
  seccomp filter is always on.
* ``-o modcaps=-mknod``: the guest cannot make device nodes on the host's
  filesystem (a device node owned by host root is a classic way out should
  anything on the host ever open that tree).
* ``-o no_xattr`` (its default): no security.* attributes (file capabilities)
  written by the guest land on the host.
* ``-o cache=auto``: close-to-open consistency, the guest's page cache keeps
  reads fast.
The path it serves is den's own (the workspace's snapshot in the root-only
volumes directory): no workspace-controlled string is ever on a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from den import tasks
from den.backends import cgroups
from den.errors import BackendFailure

log = logging.getLogger(__name__)
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
SPAWN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
GATE = ["/bin/sh", "-c", 'read _ && exec "$@"', "den-gate"]
# Controllers QEMU's cgroup is made in on a v1/hybrid host (stats read cpuacct,
# memory and pids; limits are set on cpu, memory and pids).
V1 = ("cpu", "cpuacct", "memory", "pids")


# -- the cgroup ---------------------------------------------------------------------


def _cg_dirs(path: str) -> list[Path]:
    if cgroups.unified():
        return [cgroups.ROOT / path.lstrip("/")]
    return [cgroups.ROOT / c / path.lstrip("/") for c in V1]


def make_cgroup(path: str, memory_bytes: int, cpu: float, pids: int) -> None:
    """The VM's cgroup with its limits (idempotent)."""
    if cgroups.unified():
        parent = cgroups.ROOT / path.lstrip("/").rsplit("/", 1)[0]
        parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            (parent / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    for d in _cg_dirs(path):
        d.mkdir(parents=True, exist_ok=True)
    set_limits(path, memory_bytes, cpu, pids)


def set_limits(path: str, memory_bytes: int | None, cpu: float, pids: int) -> None:
    period = 100_000
    quota = int(cpu * period) if cpu > 0 else -1
    if cgroups.unified():
        d = cgroups.ROOT / path.lstrip("/")
        (d / "cpu.max").write_text(f"{quota if quota > 0 else 'max'} {period}")
        if memory_bytes is not None:
            (d / "memory.max").write_text(str(memory_bytes))
        (d / "pids.max").write_text(str(pids) if pids > 0 else "max")
        return
    root = cgroups.ROOT
    p = path.lstrip("/")
    (root / "cpu" / p / "cpu.cfs_period_us").write_text(str(period))
    (root / "cpu" / p / "cpu.cfs_quota_us").write_text(str(quota))
    if memory_bytes is not None:
        (root / "memory" / p / "memory.limit_in_bytes").write_text(str(memory_bytes))
    (root / "pids" / p / "pids.max").write_text(str(pids) if pids > 0 else "max")


def join_cgroup(path: str, pid: int) -> None:
    for d in _cg_dirs(path):
        (d / "cgroup.procs").write_text(str(pid))


# -- processes ----------------------------------------------------------------------


def proc_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live, non-zombie ``pid``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int | None, start: int | None) -> bool:
    """``pid`` runs and is the process that was started (not a reused pid)."""
    return bool(pid) and proc_start(int(pid or 0)) == start and start is not None


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def kill_cgroup(path: str) -> None:
    """SIGKILL every process of the cgroup (QEMU and its virtiofsd)."""
    for pid in cgroups.procs(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def wait_gone(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while cgroups.procs(path):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def spawn(argv: Sequence[str], cgroup: str, log_file: Path) -> asyncio.subprocess.Process:
    """Start ``argv`` inside ``cgroup`` (through the gate), its output in ``log_file``."""
    with open(log_file, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *GATE,
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=out,
            stderr=out,
            env=SPAWN_ENV,
            start_new_session=True,
        )
    assert proc.stdin is not None
    try:
        join_cgroup(cgroup, proc.pid)
    except OSError as exc:
        proc.kill()
        await proc.wait()
        raise BackendFailure(f"cannot place {argv[0]} in cgroup {cgroup}: {exc}") from None
    proc.stdin.write(b"go\n")
    await proc.stdin.drain()
    proc.stdin.close()
    return proc


def virtiofsd_argv(socket_path: Path, source: Path) -> list[str]:
    return [
        VIRTIOFSD,
        "--daemonize",
        f"--socket-path={socket_path}",
        "-o",
        f"source={source}",
        "-o",
        "sandbox=namespace",
        "-o",
        "modcaps=-mknod",
        "-o",
        "no_xattr",
        "-o",
        "cache=auto",
        "-o",
        "log_level=warn",
    ]


async def start_virtiofsd(socket_path: Path, source: Path, cgroup: str, log_file: Path) -> None:
    """A virtiofsd serving ``source`` on ``socket_path``; returns once it listens.

    It daemonizes once QEMU connects (and exits when QEMU goes): its first
    process is reaped in the background.
    """
    socket_path.unlink(missing_ok=True)
    proc = await spawn(virtiofsd_argv(socket_path, source), cgroup, log_file)
    tasks.spawn(proc.wait(), name=f"virtiofsd {socket_path.name} reaper")
    deadline = time.monotonic() + 10.0
    while not socket_path.exists():
        if proc.returncode is not None or time.monotonic() > deadline:
            raise BackendFailure(f"virtiofsd did not start: {tail(log_file)}")
        await asyncio.sleep(0.005)


def virtiofsd_pid_file(socket_path: Path) -> Path:
    """Where QEMU's C virtiofsd keeps its lock/pid file for ``socket_path``."""
    return Path("/run/virtiofsd") / (str(socket_path).replace("/", ".") + ".pid")


async def start_qemu(argv: Sequence[str], cgroup: str, log_file: Path) -> None:
    """Start QEMU ``-daemonize``; returns once the machine is set up."""
    proc = await spawn(argv, cgroup, log_file)
    try:
        rc = await asyncio.wait_for(proc.wait(), 60.0)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BackendFailure("QEMU did not start within 60 s") from None
    if rc != 0:
        raise BackendFailure(f"QEMU failed to start (exit {rc}): {tail(log_file)}")


def tail(path: Path, lines: int = 3, limit: int = 64 << 10) -> str:
    """The last lines of a log file (only its last ``limit`` bytes are read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " / ".join(s.strip() for s in text.splitlines()[-lines:] if s.strip())[:500]


# -- QMP ------------------------------------------------------------------------------


class Monitor:
    """One kept QMP connection to a VM (QEMU serves one client at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._client: QMPClient | None = None
        self._lock = asyncio.Lock()

    async def execute(
        self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 5.0
    ) -> Any:
        async with self._lock:
            for attempt in (0, 1):
                try:
                    if self._client is None:
                        client = QMPClient("den")
                        await asyncio.wait_for(client.connect(str(self.path)), timeout)
                        self._client = client
                    return await asyncio.wait_for(self._client.execute(cmd, args), timeout)
                except (QMPError, OSError, TimeoutError, EOFError) as exc:
                    await self._drop()
                    if attempt or cmd == "quit":
                        raise BackendFailure(f"QMP {cmd} failed: {exc}") from None
            raise AssertionError("unreachable")

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 1.0)

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
