"""What is mounted where, from /proc/self/mountinfo.

``os.path.ismount`` is wrong on btrfs: a subvolume has its own device number,
so every subvolume looks like a mount point.
"""

from __future__ import annotations

import os
from pathlib import Path


def _unescape(field: str) -> str:
    return (
        field.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {_unescape(line.split()[4]) for line in f}


def is_mountpoint(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    root = os.path.realpath(path)
    found = [m for m in mount_points() if m == root or m.startswith(root.rstrip("/") + "/")]
    return sorted(found, key=len, reverse=True)
