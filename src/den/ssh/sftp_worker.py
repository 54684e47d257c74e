"""``python -I -m den.ssh.sftp_worker``: the sftp subsystem of a workspace that
has no sftp server of its own.

Started as root on the host, it joins the workspace as ``crun exec`` would:
its cgroup, then every namespace of its init process (cgroup, ipc, uts, net,
pid, mount, user), a chroot to the container's root, the workspace user's
ids and, for root, only the capabilities the workspace's processes have,
then the workspace's own seccomp filter (read from its bundle, den's, before
entering), with no_new_privs. Then it serves SFTP on stdin/stdout. Everything
is imported before the chroot; nothing from the host is reachable after it.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

from den.backends import seccomp
from den.backends.bundle import CAPABILITIES
from den.ssh import sftp_server

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


def restrict_capabilities(root: bool) -> None:
    """Keep only the capabilities a process of the workspace gets from crun: for
    its root those of the bundle, for anyone else none (changing to a uid of the
    user namespace does not clear them: the host's root was not its root)."""
    keep = {_CAP_NUMBERS[c] for c in CAPABILITIES if c in _CAP_NUMBERS} if root else set()
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


def workspace_filter(bundle: Path) -> bytes | None:
    """The compiled seccomp filter the workspace's processes run under (None:
    the workspace has none). Read from den's bundle, never from the workspace."""
    config = json.loads((bundle / "config.json").read_text())
    data = config.get("annotations", {}).get(seccomp.BPF_ANNOTATION)
    if data:
        return base64.b64decode(data)
    if config.get("linux", {}).get("seccomp"):
        bpf = seccomp.compile_bpf(config["linux"]["seccomp"])
        if bpf is None:
            raise OSError(38, "the workspace's seccomp profile cannot be compiled here")
        return bpf
    return None


def apply_filter(bpf: bytes) -> None:
    """Run under ``bpf`` from now on, as the workspace's processes do: a bug in
    this (host) process cannot reach what the profile closes."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def enter(
    pid: int, start_time: int, uid: int, gid: int, cgroup: str, bpf: bytes | None = None
) -> None:
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
    restrict_capabilities(uid == 0)
    if bpf is not None:
        apply_filter(bpf)


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
    sys.stderr.write(f"den-sftp-worker: {kind.__name__}\n")


def quiet_unraisablehook(unraisable: Any) -> None:
    sys.stderr.write(f"den-sftp-worker: {type(unraisable.exc_value).__name__}\n")


def main() -> None:
    p = argparse.ArgumentParser(prog="den-sftp-worker")
    p.add_argument("--pid", type=int, required=True, help="host pid of the workspace's init")
    p.add_argument("--start-time", type=int, required=True, help="its start time (clock ticks)")
    p.add_argument("--user", required=True, help="UID:GID inside the workspace")
    p.add_argument("--home", required=True)
    p.add_argument("--cgroup", required=True)
    p.add_argument("--bundle", type=Path, help="the workspace's bundle: its seccomp filter")
    args = p.parse_args()
    uid, gid = (int(x) for x in args.user.split(":"))
    try:
        bpf = workspace_filter(args.bundle) if args.bundle else None
        enter(args.pid, args.start_time, uid, gid, args.cgroup, bpf)
    except OSError as exc:
        sys.stderr.write(f"den-sftp-worker: cannot enter the workspace: {exc}\n")
        sys.exit(1)
    os.umask(0o022)
    try:
        os.chdir(args.home)
    except OSError:
        os.chdir("/")
    sftp_server.Server(0, 1, args.home).serve()


if __name__ == "__main__":
    main()
