"""Joining a workspace from a host process, for den's workers (the sftp worker,
the socket worker) started as root on the host with ``python -I -m``.

A worker joins the workspace as ``crun exec`` would: its cgroup, then every
namespace of its init process (cgroup, ipc, uts, net, pid, mount, user), a
chroot to the container's root, the workspace user's ids and, for root, only
the capabilities the workspace's processes have, then the workspace's own
seccomp filter (read from its bundle, den's, before entering), with
no_new_privs. Everything a worker needs is imported before the chroot;
nothing from the host is reachable after it.

Only the standard library is imported here: a worker starts in tens of
milliseconds (the socket worker is on the path of ``ssh -A`` logins).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any, NamedTuple

_libc = ctypes.CDLL(None, use_errno=True)
NAMESPACES = (
    ("cgroup", 0x02000000),
    ("ipc", 0x08000000),
    ("uts", 0x04000000),
    ("net", 0x40000000),
    ("pid", 0x20000000),
    ("mnt", 0x00020000),
    ("user", 0x10000000),
)
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 22, 38
SECCOMP_MODE_FILTER = 2
CAP_LAST = 40
_CAP_NUMBERS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_FSETID": 4,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_RAW": 13,
    "CAP_SYS_CHROOT": 18,
    "CAP_SYS_PTRACE": 19,
    "CAP_MKNOD": 27,
    "CAP_AUDIT_WRITE": 29,
    "CAP_SETFCAP": 31,
}
# den.backends.seccomp.BPF_ANNOTATION (tests check they agree): importing that
# module would double a worker's start time.
BPF_ANNOTATION = "run.oci.seccomp_bpf_data"
_prog = "den-worker"  # the name a worker's error lines start with


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


class Confinement(NamedTuple):
    """What a process of the workspace runs under, from den's bundle of it."""

    capabilities: tuple[str, ...]  # root's (the bounding set); other users get none
    bpf: bytes | None  # the compiled seccomp filter; None: the workspace has none


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def join_cgroup(cgroup: str) -> None:
    root = Path("/sys/fs/cgroup")
    rel = cgroup.strip("/")
    targets = (
        [root / rel / "cgroup.procs"]
        if (root / "cgroup.controllers").exists()
        else [
            d / rel / "cgroup.procs" for d in root.iterdir() if (d / rel / "cgroup.procs").exists()
        ]
    )
    for t in targets:
        t.write_text(str(os.getpid()))


def restrict_capabilities(keep_names: Collection[str]) -> None:
    """Keep only ``keep_names``: for the workspace's root those of its bundle, for
    anyone else none (changing to a uid of the user namespace does not clear
    them: the host's root was not its root)."""
    keep = {_CAP_NUMBERS[c] for c in keep_names if c in _CAP_NUMBERS}
    for cap in range(CAP_LAST + 1):
        if cap not in keep:
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the kernel's last: fine
    mask = [0, 0]
    for cap in keep:
        mask[cap // 32] |= 1 << (cap % 32)
    header = _CapHeader(0x20080522, 0)
    data = (_CapData * 2)(*(_CapData(m, m, 0) for m in mask))
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def open_process(pid: int, start_time: int) -> int:
    """A directory fd of ``/proc/PID`` if that pid is still the process started at
    ``start_time``: a pid reused by another workspace's process is refused. Later
    opens relative to the fd fail (ESRCH) once the process is gone, so what is
    opened through it belongs to the process checked here."""
    proc = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        stat_fd = os.open("stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
        try:
            fields = os.read(stat_fd, 4096).decode().rsplit(")", 1)[1].split()
        finally:
            os.close(stat_fd)
        if fields[0] in ("Z", "X") or int(fields[19]) != start_time:
            raise OSError(3, f"process {pid} is not the workspace's init any more")
    except BaseException:
        os.close(proc)
        raise
    return proc


def confinement(bundle: Path) -> Confinement:
    """The workspace's capabilities and seccomp filter, read from den's bundle,
    never from the workspace."""
    config = json.loads((bundle / "config.json").read_text())
    caps = config.get("process", {}).get("capabilities", {}).get("bounding", [])
    data = config.get("annotations", {}).get(BPF_ANNOTATION)
    bpf: bytes | None = None
    if data:
        bpf = base64.b64decode(data)
    elif config.get("linux", {}).get("seccomp"):
        from den.backends import seccomp  # bundles without the annotation only

        bpf = seccomp.compile_bpf(config["linux"]["seccomp"])
        if bpf is None:
            raise OSError(38, "the workspace's seccomp profile cannot be compiled here")
    return Confinement(tuple(str(c) for c in caps), bpf)


def apply_filter(bpf: bytes) -> None:
    """Run under ``bpf`` from now on, as the workspace's processes do: a bug in
    this (host) process cannot reach what the profile closes."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def enter(
    pid: int, start_time: int, uid: int, gid: int, cgroup: str, conf: Confinement | None = None
) -> None:
    """Join the workspace whose init is ``pid`` as ``uid:gid`` inside it."""
    proc = open_process(pid, start_time)
    fds = [
        (os.open(f"ns/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc), flag)
        for name, flag in NAMESPACES
    ]
    root = os.open("root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=proc)
    os.close(proc)
    join_cgroup(cgroup)
    for fd, flag in fds:
        _check(_libc.setns(fd, flag), "setns")
        os.close(fd)
    seal_imports()
    os.fchdir(root)
    os.chroot(".")
    os.close(root)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    restrict_capabilities(conf.capabilities if conf is not None and uid == 0 else ())
    if conf is not None and conf.bpf is not None:
        apply_filter(conf.bpf)


def seal_imports() -> None:
    """No import after the chroot: the interpreter would look for modules under
    the host's paths (sys.path, the encodings package) inside the workspace's
    root, so a module the workspace planted there would run in this process,
    which is outside the workspace's seccomp filter and pid namespace. A codec
    lookup (a traceback reading a "coding:" cookie of a planted source file
    did) then fails with LookupError instead."""
    sys.meta_path.clear()
    sys.path_hooks.clear()
    sys.path_importer_cache.clear()
    sys.path.clear()
    sys.excepthook = quiet_excepthook
    sys.unraisablehook = quiet_unraisablehook


def quiet_excepthook(kind: type[BaseException], exc: BaseException, tb: object) -> None:
    # The default hooks print source lines, opening the host's source paths in
    # the workspace's root: name the error only.
    sys.stderr.write(f"{_prog}: {kind.__name__}\n")


def quiet_unraisablehook(unraisable: Any) -> None:
    sys.stderr.write(f"{_prog}: {type(unraisable.exc_value).__name__}\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options every worker takes: which workspace, as whom."""
    p.add_argument("--pid", type=int, required=True, help="host pid of the workspace's init")
    p.add_argument("--start-time", type=int, required=True, help="its start time (clock ticks)")
    p.add_argument("--user", required=True, help="UID:GID inside the workspace")
    p.add_argument("--cgroup", required=True)
    p.add_argument(
        "--bundle", type=Path, required=True, help="the workspace's bundle: its confinement"
    )


def enter_from(args: argparse.Namespace, prog: str) -> None:
    """Join the workspace ``args`` name; on failure say why (as ``prog``) and exit 1."""
    global _prog
    _prog = prog
    uid, gid = (int(x) for x in args.user.split(":"))
    try:
        enter(args.pid, args.start_time, uid, gid, args.cgroup, confinement(args.bundle))
    except OSError as exc:
        sys.stderr.write(f"{prog}: cannot enter the workspace: {exc}\n")
        sys.exit(1)


def argv(module: str, init: tuple[int, int], ids: str, cgroup: str, bundle: Path) -> list[str]:
    """The command line of worker ``module`` for a workspace (its init's pid and
    start time, its cgroup and bundle), as ``ids`` inside."""
    pid, started = init
    return [
        sys.executable,
        "-I",
        "-m",
        module,
        "--pid",
        str(pid),
        "--start-time",
        str(started),
        "--user",
        ids,
        "--cgroup",
        cgroup,
        "--bundle",
        str(bundle),
    ]
