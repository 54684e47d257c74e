"""A microVM's serial console, read by den and kept to a bounded size.

QEMU serves the guest's serial port as a listening unix socket
(``console.sock``); den reads it and keeps the first :data:`HEAD` bytes (the
boot log, den-init's own lines) and the last :data:`TAIL` bytes (a panic, the
latest messages), written to ``console.log`` in the VM directory at most every
:data:`FLUSH_SECONDS` and when QEMU ends. Whatever the guest writes in between
is dropped (and counted): the guest owns the serial port, and a file QEMU
appended to would fill the host's disk outside every quota.

While nobody is connected (the daemon is down), QEMU's socket chardev refuses
each byte and the serial port drops it: the guest never blocks on den, and
what it printed meanwhile is lost, so a guest that fails while den is down
leaves only what den saw before (:meth:`MicroVMBackend.failure` then says QEMU
ended without den). A new daemon reads ``console.log`` back and carries on.

What den shows from the console (:func:`clean`) is guest-chosen text: escape
sequences and control characters are taken out and its length capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import stat
import unicodedata
from pathlib import Path

HEAD = 64 << 10
TAIL = 64 << 10
FLUSH_SECONDS = 0.5
CONNECT_SECONDS = 5.0
LOG = "console.log"
_TMP = ".console.log.den"
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-_])")


def clean(text: str, width: int = 500) -> str:
    """``text`` without escape sequences or control characters, at most ``width``
    characters: safe to put in an error message or on a terminal."""
    text = _ESCAPES.sub("", text)
    out = "".join(
        " " if c == "\t" else c for c in text if c == "\t" or unicodedata.category(c)[0] != "C"
    )
    return out[:width]


def read_log(path: Path, limit: int = HEAD + TAIL + 256) -> bytes:
    """The last ``limit`` bytes of a file in a VM directory (which QEMU's uid owns):
    never through a symbolic link, never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b""
        return os.pread(fd, limit, max(0, st.st_size - limit))
    except OSError:
        return b""
    finally:
        os.close(fd)


class Console:
    """The reader of one VM's console socket."""

    def __init__(self, vmdir: Path) -> None:
        self.vmdir = vmdir
        self.head = bytearray()
        self.tail = bytearray()
        self.dropped = 0
        self._dirty = False
        # A daemon restarted while the VM ran: what the last one kept comes first.
        self._take(read_log(vmdir / LOG))
        self._dirty = False

    def _take(self, data: bytes) -> None:
        room = HEAD - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.tail += data
        if len(self.tail) > TAIL:
            self.dropped += len(self.tail) - TAIL
            del self.tail[: len(self.tail) - TAIL]
        self._dirty = True

    def content(self) -> bytes:
        gap = (
            b"\n[den: %d bytes of console output dropped]\n" % self.dropped if self.dropped else b""
        )
        return bytes(self.head) + gap + bytes(self.tail)

    def flush(self) -> None:
        """Replace console.log with what is kept (a new file renamed over it: nothing
        QEMU's uid put at either name is followed or written through)."""
        if not self._dirty:
            return
        self._dirty = False
        try:
            dfd = os.open(self.vmdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return  # the VM directory is gone (deleted)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_TMP, dir_fd=dfd)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(_TMP, flags, 0o600, dir_fd=dfd)
            try:
                os.write(fd, self.content())
            finally:
                os.close(fd)
            os.rename(_TMP, LOG, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:
            pass  # another try at the next flush
        finally:
            os.close(dfd)

    async def run(self) -> None:
        """Read the console until QEMU ends (or closes it), then flush."""
        sock = str(self.vmdir / "console.sock")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONNECT_SECONDS
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(sock)
                break
            except OSError:
                if loop.time() >= deadline:
                    return
                await asyncio.sleep(0.05)
        try:
            next_flush = loop.time() + FLUSH_SECONDS
            while True:
                timeout = max(0.0, next_flush - loop.time()) if self._dirty else None
                try:
                    chunk = await asyncio.wait_for(reader.read(1 << 16), timeout)
                except TimeoutError:
                    chunk = None
                if chunk == b"":
                    return
                if chunk:
                    self._take(chunk)
                if self._dirty and loop.time() >= next_flush:
                    self.flush()
                    next_flush = loop.time() + FLUSH_SECONDS
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self.flush()
