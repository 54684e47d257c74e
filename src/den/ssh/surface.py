"""Small rules of a session's SSH surface: which ``env`` requests it takes, and
X11 forwarding refused in words.

A client setting any variable it likes would reach past the login: LD_PRELOAD,
BASH_ENV or PATH run code of its choosing before the shell it asked for. So, as
OpenSSH's sshd (AcceptEnv), only the locale and what the admin lists.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import asyncssh
from asyncssh.packet import SSHPacket

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
ALWAYS = ("LANG", "LC_*")  # what OpenSSH's clients send by default (SendEnv LANG LC_*)
NO_X11 = (
    "den: X11 forwarding is not supported (workspaces have no X display); "
    "reach graphical tools through a forwarded port instead (ssh -L, a web or VNC UI)\r\n"
)


def accept_env(name: str, value: str, allowed: Sequence[str]) -> bool:
    """Whether a client's ``name=value`` goes into the session's environment."""
    if not ENV_NAME.fullmatch(name) or "\0" in value:
        return False
    return any(fnmatchcase(name, p) for p in (*ALWAYS, *allowed))


def send_exit(chan: asyncssh.SSHServerChannel[Any], rc: int) -> None:
    """End the session as its process ended: ``exit-signal`` (the signal's name, as
    OpenSSH's sshd sends it) when a signal killed it (``rc`` -N), else ``exit-status``."""
    if rc < 0:
        with contextlib.suppress(ValueError):
            # No message and no language tag: what sshd sends.
            chan.exit_with_signal(signal.Signals(-rc).name.removeprefix("SIG"), False, "", "")
            return
        rc = 128 - rc
    chan.exit(rc)


def refuse_x11(chan: asyncssh.SSHServerChannel[Any]) -> None:
    """Answer ``ssh -X``'s request with a failure and a line on the session's stderr:
    the client alone prints only "X11 forwarding request failed" (not at all with
    LogLevel ERROR or in most IDEs), which does not say why."""

    def handler(packet: SSHPacket) -> bool:
        chan.write_stderr(NO_X11 if chan.get_encoding()[0] else NO_X11.encode())
        return False

    # asyncssh looks a channel request's handler up by this name on the channel.
    setattr(chan, "_process_x11_req_request", handler)  # noqa: B010
