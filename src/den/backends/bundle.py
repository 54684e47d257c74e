"""The OCI runtime configuration (config.json) of a sandbox workspace."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

from den.backends.base import Spec

INIT_PATH = "/dev/init"
TINI = Path("/usr/bin/tini-static")

# Enough for apt-get, services and debuggers inside; every one of them is
# confined to the workspace's own user namespace.
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_SETFCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
]

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def nofile_limit() -> dict[str, Any]:
    # Never above the daemon's own hard limit: raising it needs CAP_SYS_RESOURCE
    # outside the workspace's user namespace.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return {"type": "RLIMIT_NOFILE", "hard": hard, "soft": min(1024, hard)}


def config(
    spec: Spec, bundle: Path, root_view: Path, code_view: Path, netns: Path, cgroup: str
) -> dict[str, Any]:
    caps = {k: CAPABILITIES for k in ("bounding", "effective", "permitted")}
    mapping = [{"containerID": 0, "hostID": spec.uid_start, "size": spec.uid_count}]
    period = 100_000
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [INIT_PATH, "-g", "--", "sleep", "infinity"],
            "env": [f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8", "TERM=xterm-256color"],
            "cwd": "/",
            "capabilities": {**caps, "inheritable": [], "ambient": []},
            "rlimits": [nofile_limit()],
            "noNewPrivileges": False,
        },
        "root": {"path": str(root_view), "readonly": False},
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
            # The network namespace belongs to the host, so sysfs cannot be
            # mounted fresh: a read-only bind, with the host's cgroups hidden.
            {
                "destination": "/sys",
                "type": "none",
                "source": "/sys",
                "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
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
                "source": str(TINI),
                "options": ["bind", "ro", "nosuid", "nodev"],
            },
            {
                "destination": "/code",
                "type": "bind",
                "source": str(code_view),
                "options": ["rbind", "rw", "nodev"],
            },
            *(
                {
                    "destination": f"/etc/{name}",
                    "type": "bind",
                    "source": str(bundle / name),
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
            "resources": {
                "cpu": {"quota": int(spec.cpu * period), "period": period},
                "memory": {"limit": spec.memory_mb << 20},
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
