"""Facts about a workspace read from its rootfs on the host, never following
a symlink the workspace could have planted."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from den.backends.sandbox import Account, account, load_account, read_inside

# account() never waits on the workspace (no FIFO, no device, size-capped);
# load_account() also keeps the disk read off the event loop, with a timeout.
__all__ = ["Account", "account", "exists", "load_account", "read_inside"]


def exists(rootfs: Path, rel: str) -> bool:
    """Whether ``rel`` exists in the rootfs with no symlink on the way (the last may be one)."""
    parts = [p for p in rel.split("/") if p]
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(rootfs, flags | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        for part in parts[:-1]:
            nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
