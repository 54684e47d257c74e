"""Facts about a workspace read from its rootfs on the host, never following
a symlink the workspace could have planted (den.backends.inside)."""

from __future__ import annotations

from den.backends.inside import Account, account, exists, load_account, read_inside

# account() never waits on the workspace (no FIFO, no device, size-capped);
# load_account() also keeps the disk read off the event loop, with a timeout.
__all__ = ["Account", "account", "exists", "load_account", "read_inside"]
