"""The OCI runtime configuration (config.json) of a sandbox workspace."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from den.backends import cgroups
from den.backends.base import PATH, Spec
from den.backends.seccomp import Filter
from den.meta import BUSY_NAME, BUSY_PATH

INIT_PATH = "/dev/init"
TINI = Path("/usr/bin/tini-static")


@dataclass(frozen=True)
class Views:
    """The host mounts a workspace's container is made of (den.backends.view)."""

    root: Path  # idmapped view of the rootfs snapshot
    code: Path  # idmapped view of the code snapshot
    sys: Path  # sysfs of the workspace's network namespace
    etc: Path  # tmpfs with hostname, hosts, resolv.conf
    init: Path  # the instance's shared copy of tini


# Podman's default set, plus CAP_NET_RAW for ping; each is confined to the
# workspace's own user namespace and its own files (ids are mapped, the rootfs
# is the workspace's).
CAPABILITIES = [
    "CAP_CHOWN",  # chown files to the workspace's users: apt, tar, useradd
    "CAP_DAC_OVERRIDE",  # root reads and writes any file of the workspace
    "CAP_FOWNER",  # chmod, utime and xattrs on files root does not own
    "CAP_FSETID",  # keep setuid/setgid bits on chmod and writes (dpkg installing sudo)
    "CAP_KILL",  # signal processes of other workspace users (service managers)
    "CAP_NET_BIND_SERVICE",  # web servers on ports below 1024
    # Debian's ping carries the file capability cap_net_raw=ep, and execve
    # refuses a file whose capabilities the bounding set lacks. Inert otherwise:
    # the workspace's network namespace belongs to the host's user namespace, so
    # the kernel refuses raw and packet sockets to the workspace's root anyway
    # (the seccomp profile refuses them too); ping uses its ICMP datagram socket.
    "CAP_NET_RAW",
    "CAP_SETFCAP",  # file capabilities, which some packages set at install
    "CAP_SETGID",  # su, sudo, setpriv and daemons changing group
    "CAP_SETPCAP",  # drop capabilities from the bounding set (daemons, setpriv)
    "CAP_SETUID",  # su, sudo, setpriv and daemons changing user
    "CAP_SYS_CHROOT",  # chroot for build tools (debootstrap, dpkg --root)
]
# Left out: CAP_SYS_PTRACE (root could attach to another user's process; gdb
# and strace on one's own processes need no capability), CAP_MKNOD (device
# nodes; the kernel and the device cgroup refuse them anyway) and
# CAP_AUDIT_WRITE (the host's audit log; sudo works without it).
#
# no_new_privs stays off: with it, sudo and su (setuid binaries) would not gain
# root. What a process gains that way is still bounded by this set, by the
# seccomp profile and by the user namespace, so setuid root inside a workspace
# is the workspace's root and nothing more.


def nofile_limit() -> dict[str, Any]:
    # Never above the daemon's own hard limit: raising it needs CAP_SYS_RESOURCE
    # outside the workspace's user namespace.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return {"type": "RLIMIT_NOFILE", "hard": hard, "soft": min(1024, hard)}


def config(
    spec: Spec, views: Views, netns: Path, cgroup: str, seccomp: Filter | None = None
) -> dict[str, Any]:
    """The OCI config of ``spec``; ``views`` are the host mounts it is made of."""
    caps = {k: CAPABILITIES for k in ("bounding", "effective", "permitted")}
    mapping = [{"containerID": 0, "hostID": spec.uid_start, "size": spec.uid_count}]
    period = 100_000
    return {
        "ociVersion": "1.0.2",
        "annotations": seccomp.annotations() if seccomp else {},
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [INIT_PATH, "-g", "--", "sleep", "infinity"],
            "env": [f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=xterm-256color"],
            "cwd": "/",
            "capabilities": {**caps, "inheritable": [], "ambient": []},
            "rlimits": [nofile_limit()],
            "noNewPrivileges": False,  # sudo inside: see CAPABILITIES
        },
        "root": {"path": str(views.root), "readonly": False},
        "hostname": spec.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": [
                    "nosuid",
                    "noexec",
                    "newinstance",
                    "ptmxmode=0666",
                    "mode=0620",
                    "gid=5",
                ],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": ["nosuid", "noexec", "nodev"],
            },
            # The sysfs of the workspace's own network namespace (see
            # den.backends.view), with the host's cgroups hidden below.
            {
                "destination": "/sys",
                "type": "bind",
                "source": str(views.sys),
                "options": ["bind", "nosuid", "noexec", "nodev", "ro"],
            },
            {
                "destination": "/sys/fs/cgroup",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "noexec", "nodev", "ro", "size=4k"],
            },
            {
                "destination": "/run",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=755", "size=65536k"],
            },
            {
                "destination": INIT_PATH,
                "type": "bind",
                "source": str(views.init),
                "options": ["bind", "ro", "nosuid", "nodev"],
            },
            {  # den-busy (den.meta): read-only, from the same tmpfs as tini
                "destination": BUSY_PATH,
                "type": "bind",
                "source": str(views.init.parent / BUSY_NAME),
                "options": ["bind", "ro", "nosuid", "nodev"],
            },
            {
                "destination": "/code",
                "type": "bind",
                "source": str(views.code),
                "options": ["rbind", "rw", "nodev"],
            },
            *(
                {
                    "destination": f"/etc/{name}",
                    "type": "bind",
                    "source": str(views.etc / name),
                    "options": ["bind", "ro", "nosuid", "nodev", "noexec"],
                }
                for name in ("hostname", "hosts", "resolv.conf")
            ),
        ],
        "linux": {
            "uidMappings": mapping,
            "gidMappings": mapping,
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": str(netns)},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
                {"type": "cgroup"},
                {"type": "user"},
            ],
            "cgroupsPath": cgroup,
            # den.backends.seccomp; None when the admin turned it off (sandbox_seccomp)
            **(seccomp.linux() if seccomp else {}),
            "resources": {
                "cpu": {"quota": int(spec.cpu * period), "period": period},
                # Memory plus swap at the memory limit: no swapping past it.
                "memory": {
                    "limit": spec.memory_mb << 20,
                    **({"swap": spec.memory_mb << 20} if cgroups.swap_accounted() else {}),
                },
                "pids": {"limit": spec.pids},
                "devices": [{"allow": False, "access": "rwm"}],
            },
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                # Every tenant's quota group (named after its workspace id) and usage.
                "/sys/fs/btrfs",
                # Energy counters: a side channel on what other tenants compute.
                "/sys/devices/virtual/powercap",
                # Block devices: each loop device's backing_file names a host
                # path (every den pool.img on the host), and their counters
                # show other tenants' I/O.
                "/sys/block",
                "/sys/class/block",
                "/sys/devices/virtual/block",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }
