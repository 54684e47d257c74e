"""Cgroup files of a workspace: freezer, accounting, cleanup (v1/hybrid and v2)."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from pathlib import Path

from den.errors import BackendFailure

ROOT = Path("/sys/fs/cgroup")
# On a hybrid host crun also makes each cgroup in the cgroup2 mount ("unified").
V1_CONTROLLERS = (
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "hugetlb",
    "net_cls",
    "net_prio",
    "perf_event",
    "systemd",
    "unified",
)


@functools.cache
def unified() -> bool:
    """Pure cgroup v2 (the layout does not change while den runs)."""
    return (ROOT / "cgroup.controllers").exists()


@functools.cache
def swap_accounted() -> bool:
    """Whether the kernel accounts swap per cgroup, so that a swap limit can be set
    (crun fails on a limit whose file does not exist)."""
    if not unified():
        return (ROOT / "memory" / "memory.memsw.limit_in_bytes").exists()
    with contextlib.suppress(OSError):
        own = Path("/proc/self/cgroup").read_text().split("::", 1)[1].strip()
        return own != "/" and (_v2(own) / "memory.swap.max").exists()
    return False


def _file(controller: str, path: str, name: str) -> str:
    """The path of a cgroup file, as a plain string: these are read on hot paths."""
    if unified():
        return f"/sys/fs/cgroup{path}/{name}"
    return f"/sys/fs/cgroup/{controller}{path}/{name}"


def _v1(controller: str, path: str) -> Path:
    return ROOT / controller / path.lstrip("/")


def _v2(path: str) -> Path:
    return ROOT / path.lstrip("/")


def freeze(path: str, timeout: float = 5.0) -> None:
    """Freeze every process of the cgroup; return once they are frozen."""
    _set_frozen(path, True, timeout)


def thaw(path: str, timeout: float = 5.0) -> None:
    _set_frozen(path, False, timeout)


def _set_frozen(path: str, frozen: bool, timeout: float) -> None:
    try:
        if unified():
            _v2(path).joinpath("cgroup.freeze").write_text("1" if frozen else "0")
        else:
            _v1("freezer", path).joinpath("freezer.state").write_text(
                "FROZEN" if frozen else "THAWED"
            )
    except FileNotFoundError:
        raise BackendFailure(f"cgroup {path} is missing: is the workspace running?") from None
    deadline = time.monotonic() + timeout
    while is_frozen(path) != frozen:
        if time.monotonic() > deadline:
            raise BackendFailure(
                f"cgroup {path} did not {'freeze' if frozen else 'thaw'} in {timeout}s"
            )
        time.sleep(0.0002)


def is_frozen(path: str) -> bool:
    try:
        if unified():
            with open(_file("", path, "cgroup.events")) as f:
                return "frozen 1" in f.read()
        with open(_file("freezer", path, "freezer.state")) as f:
            return f.read().strip() == "FROZEN"
    except FileNotFoundError:
        return False


def _read_int(p: str) -> int:
    try:
        with open(p) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def cpu_seconds(path: str) -> float:
    if unified():
        try:
            with open(_file("", path, "cpu.stat")) as f:
                for line in f:
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6
        except OSError:
            return 0.0
        return 0.0
    return _read_int(_file("cpuacct", path, "cpuacct.usage")) / 1e9


def memory_bytes(path: str) -> int:
    """Memory in use, without the page cache that can be dropped."""
    if unified():
        return _read_int(_file("", path, "memory.current"))
    usage = _read_int(_file("memory", path, "memory.usage_in_bytes"))
    inactive = 0
    with contextlib.suppress(OSError, ValueError), open(_file("memory", path, "memory.stat")) as f:
        for line in f:
            if line.startswith("total_inactive_file "):
                inactive = int(line.split()[1])
                break
    return max(0, usage - inactive)


def pids(path: str) -> int:
    return _read_int(_file("pids", path, "pids.current"))


def oom_kills(path: str) -> int:
    if unified():
        try:
            for line in _v2(path).joinpath("memory.events").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except OSError:
            return 0
        return 0
    try:
        for line in _v1("memory", path).joinpath("memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def dirs(path: str) -> list[Path]:
    """Every directory of this cgroup path that exists on the host."""
    if unified():
        return [p for p in (_v2(path),) if p.is_dir()]
    return [p for c in V1_CONTROLLERS if (p := _v1(c, path)).is_dir()]


def remove(path: str) -> None:
    """Remove the cgroup directories (children first); busy or missing is skipped."""
    for d in dirs(path):
        for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            with contextlib.suppress(OSError):
                os.rmdir(sub)
        with contextlib.suppress(OSError):
            os.rmdir(d)


def children(parent: str) -> list[str]:
    """Names of the cgroups under ``parent`` (in any controller)."""
    names: set[str] = set()
    for d in dirs(parent):
        names.update(p.name for p in d.iterdir() if p.is_dir())
    return sorted(names)


def procs(path: str) -> list[int]:
    """Pids in the cgroup (empty when it is gone)."""
    f = _v2(path) / "cgroup.procs" if unified() else _v1("pids", path) / "cgroup.procs"
    try:
        return [int(x) for x in f.read_text().split()]
    except (OSError, ValueError):
        return []
