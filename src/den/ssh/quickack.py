"""Acknowledge every packet from SSH clients at once (TCP_QUICKACK).

The OpenSSH client does not set TCP_NODELAY before a session is interactive,
so during the handshake it holds back its next small message (Nagle) until
the previous one is acknowledged, while Linux delays that acknowledgement by
up to 40 ms because the server has nothing to send yet. Two such stalls made
half of ``ssh host true`` (110 ms; 25 ms with this). QUICKACK is not sticky,
so it is set again after each receive; asyncssh has no hook for that, hence
a wrapper around its server connection's ``data_received``.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from asyncssh.connection import SSHServerConnection

_ATTR = "_den_quickack_socket"
_installed = False


def install() -> None:
    global _installed
    if _installed or not hasattr(socket, "TCP_QUICKACK"):
        return
    _installed = True
    original = SSHServerConnection.data_received

    def data_received(self: SSHServerConnection, data: bytes, datatype: Any = None) -> None:
        original(self, data, datatype)
        if not hasattr(self, _ATTR):
            found = self.get_extra_info("socket")
            tcp = found is not None and found.family in (socket.AF_INET, socket.AF_INET6)
            setattr(self, _ATTR, found if tcp else None)
        sock: Any = getattr(self, _ATTR)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

    SSHServerConnection.data_received = data_received  # type: ignore[method-assign,assignment]
