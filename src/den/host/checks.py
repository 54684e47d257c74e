"""Checks of the host den runs on; each says what is wrong and what fixes it."""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from den.config import Settings
from den.storage import btrfs

# tool -> Debian package that provides it
TOOLS = {
    "crun": "crun",
    "btrfs": "btrfs-progs",
    "mkfs.btrfs": "btrfs-progs",
    "debootstrap": "debootstrap",
    "git": "git",
    "tini": "tini",
    "nft": "nftables",
    "useradd": "passwd",
    "tar": "tar",
    "mount": "mount",
    # The web front door: Caddy, started as its own account through setpriv.
    "caddy": "caddy",
    "setpriv": "util-linux",
}
MODULES = {"btrfsutil": "python3-btrfsutil", "nftables": "python3-nftables"}
NAMESPACES = ("user", "pid", "net", "mnt", "uts", "ipc", "cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what `den init` does about it, empty when it cannot
    package: str = ""


def cgroup_layout() -> str:
    """ "v2" (unified), "hybrid" (v1 controllers + a cgroup2 mount) or "v1"."""
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return "v2"
    if (CGROUP_ROOT / "unified").is_dir() and (CGROUP_ROOT / "unified" / "cgroup.procs").exists():
        return "hybrid"
    return "v1"


def hugetlb_missing() -> bool:
    """crun refuses hybrid hosts whose hugetlb v1 controller is not mounted."""
    return cgroup_layout() == "hybrid" and not (CGROUP_ROOT / "hugetlb" / "cgroup.procs").exists()


def _filesystems() -> str:
    try:
        return Path("/proc/filesystems").read_text()
    except OSError:
        return ""


def _module_ok(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def fstab_has(settings: Settings) -> bool:
    try:
        lines = settings.fstab.read_text().splitlines()
    except FileNotFoundError:
        return False
    want = str(settings.pool_dir)
    return any(
        len(ln.split()) >= 2 and ln.split()[1] == want for ln in lines if not ln.startswith("#")
    )


def run_checks(settings: Settings) -> list[Check]:
    out = [
        Check("linux", platform.system() == "Linux", platform.platform()),
        Check("root", os.geteuid() == 0, f"euid {os.geteuid()}"),
    ]
    fss = _filesystems()
    out.append(
        Check(
            "kernel btrfs",
            "btrfs" in fss,
            "btrfs in /proc/filesystems"
            if "btrfs" in fss
            else "no btrfs in /proc/filesystems: load the module (modprobe btrfs) or use the overlay driver",
        )
    )
    out.append(Check("kernel overlayfs", "overlay" in fss, "overlay in /proc/filesystems"))
    missing_ns = [n for n in NAMESPACES if not Path(f"/proc/self/ns/{n}").exists()]
    out.append(
        Check(
            "namespaces",
            not missing_ns,
            "missing: " + ", ".join(missing_ns) if missing_ns else ", ".join(NAMESPACES),
        )
    )
    try:
        max_userns = int(Path("/proc/sys/user/max_user_namespaces").read_text())
    except (OSError, ValueError):
        max_userns = 0
    out.append(Check("user namespaces", max_userns > 0, f"max_user_namespaces={max_userns}"))
    layout = cgroup_layout()
    out.append(Check("cgroups", True, f"layout {layout}"))
    if layout == "hybrid":
        missing = hugetlb_missing()
        out.append(
            Check(
                "cgroup hugetlb (crun on a hybrid host)",
                not missing,
                "hugetlb v1 controller not mounted" if missing else "mounted",
                fix="mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb" if missing else "",
            )
        )
    for tool, pkg in TOOLS.items():
        path = shutil.which(tool)
        out.append(
            Check(
                f"tool {tool}",
                path is not None,
                path or f"missing (package {pkg})",
                fix=f"apt-get install {pkg}" if path is None else "",
                package=pkg,
            )
        )
    for mod, pkg in MODULES.items():
        ok = _module_ok(mod)
        out.append(
            Check(
                f"python {mod}",
                ok,
                "importable" if ok else f"missing (package {pkg})",
                fix=f"apt-get install {pkg}" if not ok else "",
                package=pkg,
            )
        )
    out.append(network_report(settings))
    clash = ephemeral_clashes(settings)
    out.append(
        Check(
            "listening ports",
            True,  # den works; a restarted listener may find its port taken
            "warning: " + "; ".join(clash) if clash else "outside the kernel's ephemeral range",
        )
    )
    pool = settings.pool_dir
    if settings.storage_driver == "overlay":
        out.append(
            Check(
                "storage pool",
                pool.is_dir(),
                f"{pool}: overlayfs driver (by configuration)",
                fix="" if pool.is_dir() else f"mkdir {pool}",
            )
        )
    else:
        on_btrfs = pool.is_dir() and btrfs.is_btrfs(pool)
        detail = (
            f"{pool} on btrfs"
            if on_btrfs
            else (f"{pool} is not on btrfs: snapshots would fall back to overlayfs")
        )
        out.append(
            Check(
                "storage pool",
                on_btrfs,
                detail,
                fix=""
                if on_btrfs
                else f"make a {settings.pool_size} btrfs loopback pool at {pool}",
            )
        )
        if on_btrfs and settings.pool_image.exists():
            rec = fstab_has(settings)
            out.append(
                Check(
                    "pool mount recorded",
                    rec,
                    f"{settings.fstab}",
                    fix="" if rec else f"add the pool mount to {settings.fstab}",
                )
            )
    return out


EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_clashes(settings: Settings, range_file: Path = EPHEMERAL) -> list[str]:
    """den's fixed listening ports that lie in the kernel's ephemeral range.

    The kernel gives ports of that range to outgoing connections: while a
    listener is down (Caddy restarted after a crash, den restarted) any
    connection on the host may take its port, and the listener cannot bind it
    again until that connection ends.
    """
    try:
        low, high = (int(x) for x in range_file.read_text().split())
    except (OSError, ValueError):
        return []
    ports = {"http_port": settings.http_port, "ssh_port": settings.ssh_port}
    if settings.web:
        ports["https_port"] = settings.web_port
    if settings.mail_domain:
        ports["mail_port"] = settings.mail_port
    return [
        f"{name} {port} is in the ephemeral range {low}-{high} "
        f"(net.ipv4.ip_local_port_range): pick a port below {low}"
        for name, port in ports.items()
        if port and low <= port <= high
    ]


def network_report(settings: Settings) -> Check:
    """What den has set on the host's network for this instance (undone with the last workspace)."""
    from den.net.network import Network

    net = Network(settings.instance, settings.network_subnet, settings.egress, [])
    try:
        changes = net.host_changes()
    except Exception as exc:  # noqa: BLE001 - a report must not fail on a missing tool
        return Check("network changes by den", True, f"cannot tell: {exc}")
    parts = []
    if changes["bridge"]:
        parts.append(f"bridge {changes['bridge']}")
    tables = changes["nftables"]
    if isinstance(tables, list) and tables:
        parts.append("nftables " + ", ".join(tables))
    if changes["ip_forward_before"] is not None:
        parts.append(f"net.ipv4.ip_forward=1 (was {changes['ip_forward_before']})")
    detail = "; ".join(parts) if parts else "none (no workspace is running)"
    return Check("network changes by den", True, detail)
