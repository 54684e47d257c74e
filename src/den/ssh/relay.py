"""Moving bytes between file descriptors (pipes, a pty master) and SSH channels.

Readers and writers sit on the event loop with ``add_reader``/``add_writer``;
both honour flow control so that a slow side never makes the daemon buffer
without bound.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable

CHUNK = 1 << 18
HIGH_WATER = 1 << 20


class FdReader:
    """Calls ``on_data`` with what arrives on ``fd``, then ``on_eof`` once."""

    def __init__(
        self, fd: int, on_data: Callable[[bytes], None], on_eof: Callable[[], None]
    ) -> None:
        self.fd = fd
        self.on_data = on_data
        self.on_eof = on_eof
        self.loop = asyncio.get_running_loop()
        self.done = asyncio.Event()
        self._paused = False
        os.set_blocking(fd, False)
        self.loop.add_reader(fd, self._ready)

    def _ready(self) -> None:
        try:
            data = os.read(self.fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EIO: a pty whose other side is closed
            if exc.errno not in (errno.EIO, errno.EBADF):
                raise
            data = b""
        if data:
            self.on_data(data)
            return
        self.close()
        self.on_eof()

    def pause(self) -> None:
        if not self._paused and not self.done.is_set():
            self._paused = True
            self.loop.remove_reader(self.fd)

    def resume(self) -> None:
        if self._paused and not self.done.is_set():
            self._paused = False
            self.loop.add_reader(self.fd, self._ready)

    def close(self) -> None:
        """Stop reading (the fd is closed by its owner)."""
        if not self.done.is_set():
            self.loop.remove_reader(self.fd)
            self.done.set()


class FdWriter:
    """Writes to ``fd`` without blocking; tells when its buffer is full and drained."""

    def __init__(
        self,
        fd: int,
        on_full: Callable[[], None] = lambda: None,
        on_drained: Callable[[], None] = lambda: None,
        close_fd: bool = True,
    ) -> None:
        self.fd = fd
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.on_full = on_full
        self.on_drained = on_drained
        self.close_fd = close_fd
        self._full = False
        self._closing = False
        self.closed = False
        os.set_blocking(fd, False)

    def write(self, data: bytes) -> None:
        if self.closed or self._closing:
            return
        if not self.buf:
            try:
                n = os.write(self.fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:  # the reader went away: drop, as a closed pipe would
                self._finish()
                return
            data = data[n:]
            if not data:
                return
            self.loop.add_writer(self.fd, self._ready)
        self.buf += data
        if not self._full and len(self.buf) > HIGH_WATER:
            self._full = True
            self.on_full()

    def _ready(self) -> None:
        try:
            n = os.write(self.fd, self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish()
            return
        del self.buf[:n]
        if self._full and len(self.buf) < HIGH_WATER // 4:
            self._full = False
            self.on_drained()
        if not self.buf:
            self.loop.remove_writer(self.fd)
            if self._closing:
                self._finish()

    def close(self) -> None:
        """Close once everything buffered is written (EOF for a pipe)."""
        self._closing = True
        if not self.buf:
            self._finish()

    def _finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.buf.clear()
        self.loop.remove_writer(self.fd)
        if self.close_fd:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        if self._full:
            self._full = False
            self.on_drained()


async def receive_fd(listener: socket.socket, timeout: float = 10.0) -> int:
    """Accept one connection on a unix socket and receive the fd sent over it."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    conn, _ = await asyncio.wait_for(loop.sock_accept(listener), timeout)
    with conn:
        fds = array.array("i")
        fut: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(conn.fileno(), readable)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(conn.fileno())
        _msg, anc, _flags, _addr = conn.recvmsg(64, socket.CMSG_LEN(fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    if not fds:
        raise OSError("no file descriptor received on the console socket")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]
