"""Sockets made inside a workspace's network namespace, from the daemon.

A socket belongs to the namespace it was created in, whatever thread uses it
later: one thread switches namespaces to create it, and returns home at once.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
# One thread switches namespaces, so that no other thread ever runs in the wrong one.
netns_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="den-netns")


def socket_in(netns: Path, family: int) -> socket.socket:
    """A TCP socket created in the network namespace ``netns`` (this thread returns home)."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the workspace's network failed")
        try:
            return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:
                log.critical("could not return to the host network namespace; exiting")
                os._exit(70)
    finally:
        os.close(home)
        os.close(target)
