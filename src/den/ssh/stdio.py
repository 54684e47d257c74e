"""Per-thread standard streams, so that CLI commands run in-process for an SSH
session print to its channel and read from it.

The generated CLI writes to ``sys.stdout``/``sys.stderr``, Rich consoles in
:mod:`den.cli.render` and reads ``sys.stdin``. :func:`install` replaces each
once with a proxy that sends a thread bound by :func:`bind` to that session's
streams and every other thread to the real ones.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, Literal, cast

from rich.console import Console

from den.cli import generate, render


class ChannelText:
    """A text stream whose writes go to ``send`` (made thread-safe by the caller)."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, send: Callable[[str], None], tty: bool) -> None:
        self._send = send
        self._tty = tty

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            # click probes streams with b"": a text stream must refuse bytes.
            raise TypeError("write() argument must be str")
        if s:
            self._send(s)
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return self._tty


class ChannelInput:
    """Reads what ``readline`` hands over (blocking, in the command's thread)."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, readline: Callable[[], str], tty: bool) -> None:
        self._readline = readline
        self._tty = tty

    def readline(self, size: int | None = -1) -> str:
        return self._readline()

    def read(self, size: int | None = -1) -> str:
        parts = []
        while line := self._readline():
            parts.append(line)
        return "".join(parts)

    def isatty(self) -> bool:
        return self._tty


@dataclass
class Streams:
    stdout: ChannelText
    stderr: ChannelText
    stdin: ChannelInput
    console: Console
    err_console: Console


_local = threading.local()


def current() -> Streams | None:
    s: Streams | None = getattr(_local, "streams", None)
    return s


class _StreamProxy:
    def __init__(self, name: str, real: Any) -> None:
        self._name = name
        self._real = real

    def _target(self) -> Any:
        s = current()
        return getattr(s, self._name) if s is not None else self._real

    def write(self, text: str) -> int:
        n: int = self._target().write(text)
        return n

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return bool(self._target().isatty())

    def fileno(self) -> int:
        return int(self._target().fileno())

    def readline(self, size: int | None = -1) -> str:
        return str(self._target().readline())

    def read(self, size: int | None = -1) -> str:
        return str(self._target().read())

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target(), attr)


class _ConsoleProxy:
    """Stands for a Rich console of :mod:`den.cli.render`."""

    def __init__(self, name: str, real: Console) -> None:
        self._name = name
        self._real = real

    def __getattr__(self, attr: str) -> Any:
        s = current()
        return getattr(getattr(s, self._name) if s is not None else self._real, attr)


_installed = False


def install() -> None:
    """Put the proxies in place (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    sys.stdout = _StreamProxy("stdout", sys.stdout)
    sys.stderr = _StreamProxy("stderr", sys.stderr)
    sys.stdin = _StreamProxy("stdin", sys.stdin)
    setattr(render, "console", _ConsoleProxy("console", render.console))  # noqa: B010
    setattr(render, "err_console", _ConsoleProxy("err_console", render.err_console))  # noqa: B010
    original = generate.read_input

    def read_input(path: str) -> str:
        # Over SSH a path would name a file of the server: only "-" (the
        # session's standard input) is accepted.
        if current() is None:
            return original(path)
        if path != "-":
            import typer

            raise typer.BadParameter(
                f"{path}: over ssh, pass - and send the file on standard input "
                "(ssh HOST key add NAME - < key.pub)"
            )
        return sys.stdin.read()

    setattr(generate, "read_input", read_input)  # noqa: B010


@contextmanager
def bound(streams: Streams) -> Iterator[None]:
    """Route this thread's standard streams to ``streams`` inside the block."""
    _local.streams = streams
    try:
        yield
    finally:
        _local.streams = None


def make_streams(
    out: Callable[[str], None],
    err: Callable[[str], None],
    readline: Callable[[], str],
    tty: bool,
    width: int,
) -> Streams:
    stdout, stderr = ChannelText(out, tty), ChannelText(err, tty)
    # Piped output keeps whole table cells, as the CLI does for a pipe.
    w = width if tty and width else 4096
    color: Literal["standard"] | None = "standard" if tty else None
    return Streams(
        stdout=stdout,
        stderr=stderr,
        stdin=ChannelInput(readline, tty),
        console=Console(
            file=cast(IO[str], stdout), width=w, force_terminal=tty, color_system=color
        ),
        err_console=Console(
            file=cast(IO[str], stderr),
            width=w,
            soft_wrap=True,
            force_terminal=tty,
            color_system=color,
        ),
    )
