"""The host side of den's control channel into a microVM (PROTOCOL.md beside this file).

QEMU serves the guest's virtio-serial port ``den.agent`` as a unix socket; den's
agent (agent/den-agent.c) is PID 1 on the other end. One :class:`AgentChannel`
multiplexes every exec, terminal and TCP relay of a workspace over it.

Everything the guest sends is untrusted: frames are checked (magic, length cap,
checksum) and a broken one ends the connection; data past a channel's credit
window ends that channel. So what den holds for a guest is bounded by
``WINDOW_OUT`` per open channel, whatever the guest does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal as signals
import socket
import struct
import time
import zlib
from collections import deque
from pathlib import Path

from den import tasks
from den.backends.base import ExecExit, ExecResult, Terminal
from den.backends.inside import MAX_ID
from den.errors import BackendFailure, InvalidParams

VERSION = 1
MAGIC = b"dn"
HEADER = struct.Struct(">2sBBII")  # magic, type, flags (0), channel, payload length
TRAILER = 4  # crc32 of header + payload
MAX_PAYLOAD = 65536
DATA_CHUNK = 32768
WINDOW_IN = 65536  # bytes we may have in flight to the agent per channel (its stdin buffer)
WINDOW_OUT = 262144  # bytes the agent may have in flight to us per channel (held here)
DRAIN_SECONDS = 0.2  # after the command ended, output silent this long ends read()
# Credit goes back in WINDOW_OUT/4 steps, not per frame: a guest sending 1-byte
# frames must not make den queue a 20-byte grant for each (the agent keeps at
# least 3/4 of its window, so it never stalls on a grant den still owes).
GRANT_AT = WINDOW_OUT // 4
# What den may have queued for a guest that does not read its port: past this
# the agent is broken (a healthy one reads in ms) and the connection is dropped.
MAX_BUFFERED = 256 << 10
SEND_SECONDS = 15.0  # longest wait for the port to take a frame (a suspended VM waits too)
OPEN_SECONDS = 10.0  # longest wait for the agent's answer to a request (it answers in ms)
HELLO_RETRY = 0.5

(
    T_HELLO,
    T_EXEC,
    T_CONNECT,
    T_DATA,
    T_DATA_ERR,
    T_EOF,
    T_WINDOW,
    T_SIGNAL,
    T_RESIZE,
    T_EXIT,
    T_CLOSE,
    T_ERROR,
    T_OPENED,
    T_SETTIME,
    T_POWEROFF,
    T_PING,
    T_OK,
) = range(1, 18)


class AgentError(BackendFailure):
    """The agent refused a request; ``errno`` is its reason (0 if none)."""

    def __init__(self, message: str, err: int = 0) -> None:
        super().__init__(message)
        self.errno = err


class AgentGone(BackendFailure):
    """The connection to the agent ended (the VM stopped, or the guest broke the protocol)."""


def frame(type_: int, ch: int, payload: bytes = b"") -> bytes:
    head = HEADER.pack(MAGIC, type_, 0, ch, len(payload))
    body = head + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _s16(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _s32(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def exec_payload(
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    uid: int,
    gid: int,
    groups: list[int],
    tty: Terminal | None,
) -> bytes:
    """An EXEC request; values the wire cannot carry are refused here (InvalidParams),
    never left to struct.error (an "Internal error")."""
    for value in (uid, gid, *groups):
        if not 0 <= value <= MAX_ID:
            raise InvalidParams(f"id {value} is out of range (0 to {MAX_ID})", field="user")
    if len(groups) > 0xFFFF:
        raise InvalidParams("too many supplementary groups", field="user")
    term, cwd_b = (tty.term if tty else "").encode(), cwd.encode()
    if len(term) > 0xFFFF:
        raise InvalidParams("the terminal type is too long", field="term")
    if len(cwd_b) > 0xFFFF:
        raise InvalidParams("the working directory is too long", field="cwd")
    parts = [struct.pack(">III", uid, gid, len(groups))]
    parts += [struct.pack(">I", g) for g in groups]
    if tty is None:
        parts.append(b"\0")
    else:
        # a PTY's size as resize() clamps it: clients may send any 32-bit value
        cols, rows = (max(1, min(n, 0xFFFF)) for n in (tty.cols, tty.rows))
        parts.append(struct.pack(">BHH", 1, cols, rows) + _s16(term))
    parts.append(_s16(cwd_b))
    parts.append(struct.pack(">I", len(argv)))
    parts += [_s32(a.encode()) for a in argv]
    parts.append(struct.pack(">I", len(env)))
    parts += [_s32(f"{k}={v}".encode()) for k, v in env.items()]
    return b"".join(parts)


class _Chan:
    """One channel's state on the host side."""

    def __init__(self, agent: AgentChannel, ch: int) -> None:
        self.agent = agent
        self.id = ch
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[int] = loop.create_future()
        self.exited: asyncio.Future[ExecExit] = loop.create_future()
        self.queue: deque[tuple[int, bytearray]] = deque()
        self.held = 0  # bytes the agent sent that are queued here
        self.owed = 0  # bytes taken from the queue and not yet granted back
        self.changed = asyncio.Event()
        self.ended: set[int] = set()  # streams at EOF
        self.credit = WINDOW_IN
        self.gone: str | None = None  # why the channel is dead, once it is
        self.closed = False

    def poke(self) -> None:
        self.changed.set()

    def fail(self, why: str) -> None:
        if self.gone is None:
            self.gone = why
        for fut in (self.opened, self.exited):
            if not fut.done():
                fut.set_exception(AgentGone(why))
                fut.exception()  # retrieved: nobody may be waiting on it
        self.poke()

    def on_frame(self, type_: int, payload: bytes) -> None:
        if type_ in (T_DATA, T_DATA_ERR):
            if self.held + self.owed + len(payload) > WINDOW_OUT:
                # the guest ignored the credit window: hold nothing more for it
                self.fail("the agent sent past the window")
                self.agent.send_nowait(T_CLOSE, self.id)
                self.agent.forget(self.id)
                return
            self.held += len(payload)
            stream = 2 if type_ == T_DATA_ERR else 1
            last = self.queue[-1] if self.queue else None
            if last is not None and last[0] == stream and len(last[1]) < DATA_CHUNK:
                last[1].extend(payload)  # tiny frames: bytes held, not an object each
            else:
                self.queue.append((stream, bytearray(payload)))
        elif type_ == T_EOF and len(payload) == 1:
            self.ended.add(payload[0])
        elif type_ == T_WINDOW and len(payload) == 4:
            self.credit = min(WINDOW_IN, self.credit + struct.unpack(">I", payload)[0])
        elif type_ == T_OPENED and len(payload) == 4:
            if not self.opened.done():
                self.opened.set_result(struct.unpack(">I", payload)[0])
        elif type_ == T_EXIT and len(payload) == 8:
            code, sig = struct.unpack(">iI", payload)
            if not self.exited.done():
                self.exited.set_result(ExecExit(code, sig or None))
        elif type_ in (T_OK,):
            if not self.opened.done():
                self.opened.set_result(0)
        elif type_ == T_ERROR and len(payload) >= 4:
            err = struct.unpack(">I", payload[:4])[0]
            msg = payload[4:].decode(errors="replace")
            if not self.opened.done():
                self.opened.set_exception(AgentError(msg, err))
                self.agent.forget(self.id)
            # a later error (data after eof...) is ours to have avoided: nothing to do
        self.poke()

    def take(self) -> tuple[int, bytes]:
        """The next chunk of output; its bytes are granted back to the agent once
        GRANT_AT of them are owed (one WINDOW frame per quarter window)."""
        stream, data = self.queue.popleft()
        self.held -= len(data)
        self.owed += len(data)
        if self.owed >= GRANT_AT:
            self.agent.send_nowait(T_WINDOW, self.id, struct.pack(">I", self.owed))
            self.owed = 0
        return stream, bytes(data)

    async def send(self, data: bytes) -> bool:
        """Send ``data`` within the credit; False once the channel is dead."""
        view = memoryview(data)
        while view:
            while self.credit <= 0:
                if self.gone is not None or self.closed:
                    return False
                self.changed.clear()
                await self.changed.wait()
            if self.gone is not None or self.closed:
                return False
            n = min(len(view), self.credit, DATA_CHUNK)
            self.credit -= n
            await self.agent.send(T_DATA, self.id, bytes(view[:n]))
            view = view[n:]
        return True

    def close_now(self) -> None:
        if not self.closed:
            self.closed = True
            self.agent.send_nowait(T_CLOSE, self.id)
            self.agent.forget(self.id)
            self.poke()


class AgentExec:
    """A command running in the guest (den.backends.base.ExecStream)."""

    def __init__(self, chan: _Chan, pid: int, tty: bool) -> None:
        self._c = chan
        self.pid = pid  # inside the guest
        self._tty = tty
        self._streams = {1} if tty else {1, 2}
        self._exit_seen_at: float | None = None

    async def read(self) -> tuple[int, bytes] | None:
        c = self._c
        loop = asyncio.get_running_loop()
        while True:
            if c.queue:
                return c.take()
            if self._streams <= c.ended or c.gone is not None or c.closed:
                return None
            timeout: float | None = None
            if c.exited.done():
                if self._exit_seen_at is None:
                    self._exit_seen_at = loop.time()
                timeout = self._exit_seen_at + DRAIN_SECONDS - loop.time()
                if timeout <= 0:
                    return None  # ended, and silent: a background process holds the streams
            c.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(c.changed.wait(), timeout)

    async def write(self, data: bytes) -> None:
        await self._c.send(data)  # the agent drops it, returning credit, once stdin is closed

    async def close_stdin(self) -> None:
        c = self._c
        if c.gone is None and not c.closed:
            await c.agent.send(T_EOF, c.id, b"\0")

    def signal(self, sig: int) -> None:
        c = self._c
        if not c.exited.done() and c.gone is None and not c.closed:
            c.agent.send_nowait(T_SIGNAL, c.id, struct.pack(">I", sig))

    def resize(self, cols: int, rows: int) -> None:
        c = self._c
        if self._tty and c.gone is None and not c.closed:
            cols = max(1, min(cols, 0xFFFF))
            rows = max(1, min(rows, 0xFFFF))
            c.agent.send_nowait(T_RESIZE, c.id, struct.pack(">HH", cols, rows))

    async def wait(self) -> ExecExit:
        return await asyncio.shield(self._c.exited)

    async def close(self) -> None:
        self._c.close_now()


class AgentChannel:
    """A connection to one guest's agent."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        version: int,
        boot_id: str,
        rest: bytes = b"",
    ) -> None:
        self._reader = reader
        self._rest = rest  # bytes read past the hello reply
        self._writer = writer
        self.version = version
        self.boot_id = boot_id  # new at every boot of the guest
        self._chans: dict[int, _Chan] = {}
        self._next = 1
        self._lost: str | None = None
        self._pump_task = tasks.spawn(self._pump(), name="microvm agent reader")
        self._relays: set[asyncio.Task[None]] = set()

    # ---- connection ------------------------------------------------------------

    @classmethod
    async def open(cls, sock_path: Path, timeout: float) -> AgentChannel:
        """Connect to the agent's socket and say hello; waits up to ``timeout``
        for the socket to appear and the agent to answer (the guest may still boot)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(
                    str(sock_path), limit=2 * (HEADER.size + MAX_PAYLOAD + TRAILER)
                )
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() >= deadline:
                    raise AgentGone(f"no agent socket at {sock_path}") from None
                await asyncio.sleep(0.05)
        try:
            version, boot_id, rest = await asyncio.wait_for(
                cls._hello(reader, writer), max(0.1, deadline - loop.time())
            )
        except BaseException as e:
            writer.close()
            if isinstance(e, TimeoutError):
                raise AgentGone(f"the agent did not answer within {timeout:g} s") from None
            raise
        return cls(reader, writer, version, boot_id, rest)

    @staticmethod
    async def _hello(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, str, bytes]:
        nonce = os.urandom(8)
        hello = frame(
            T_HELLO, 0, struct.pack(">I", VERSION) + nonce + struct.pack(">Q", time.time_ns())
        )
        # Zeros first: they complete any frame an earlier connection left half-sent,
        # after which the agent hunts for this hello (PROTOCOL.md, "Sessions").
        writer.write(bytes(HEADER.size + MAX_PAYLOAD + TRAILER) + hello)
        await writer.drain()
        buf = b""
        want = HEADER.pack(MAGIC, T_HELLO, 0, 0, 36)
        loop = asyncio.get_running_loop()
        next_hello = loop.time() + HELLO_RETRY
        while True:
            # bytes before our reply may be stale ones of an earlier session: skip them
            i = buf.find(want)
            if i >= 0 and len(buf) >= i + HEADER.size + 36 + TRAILER:
                body = buf[i : i + HEADER.size + 36]
                (crc,) = struct.unpack(">I", buf[i + len(body) : i + len(body) + TRAILER])
                payload = body[HEADER.size :]
                if zlib.crc32(body) == crc and payload[4:12] == nonce:
                    version = struct.unpack(">I", payload[:4])[0]
                    if version != VERSION:
                        raise AgentError(f"the agent speaks version {version}, den {VERSION}")
                    # what follows (duplicate replies) is the reader's
                    return version, payload[12:28].hex(), buf[i + len(body) + TRAILER :]
                buf = buf[i + 1 :]
                continue
            if i < 0:
                buf = buf[-(len(want) - 1) :] if len(buf) >= len(want) else buf
            try:
                chunk = await asyncio.wait_for(
                    reader.read(65536), max(0.01, next_hello - loop.time())
                )
            except TimeoutError:
                # the guest may have opened its port after our first hello: say it again
                writer.write(hello)
                await writer.drain()
                next_hello = loop.time() + HELLO_RETRY
                continue
            if not chunk:
                raise AgentGone("the agent's socket closed during hello")
            buf += chunk

    async def _readexactly(self, n: int) -> bytes:
        if self._rest:
            got, self._rest = self._rest[:n], self._rest[n:]
            if len(got) < n:
                got += await self._reader.readexactly(n - len(got))
            return got
        return await self._reader.readexactly(n)

    async def _pump(self) -> None:
        """Read frames and hand them to their channels, until the connection ends."""
        why = "the connection to the agent closed"
        try:
            while True:
                head = await self._readexactly(HEADER.size)
                magic, type_, _flags, ch, length = HEADER.unpack(head)
                if magic != MAGIC or length > MAX_PAYLOAD:
                    why = "the agent sent a malformed frame"
                    break
                rest = await self._readexactly(length + TRAILER)
                payload = rest[:length]
                if zlib.crc32(head + payload) != struct.unpack(">I", rest[length:])[0]:
                    why = "the agent sent a frame with a bad checksum"
                    break
                if ch == 0:
                    continue  # hello duplicates; session errors (we never cause them)
                chan = self._chans.get(ch)
                if chan is not None:
                    chan.on_frame(type_, payload)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._lose(why)

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
        for chan in list(self._chans.values()):
            chan.fail(why)
        self._chans.clear()
        # abort, not close: close flushes first, forever for a guest that stopped reading
        self._writer.transport.abort()

    @property
    def alive(self) -> bool:
        return self._lost is None

    async def close(self) -> None:
        """End the connection (the agent then ends every command of this session)."""
        self._lose("closed")
        for t in list(self._relays):
            t.cancel()
        self._pump_task.cancel()
        with contextlib.suppress(BaseException):
            await self._pump_task

    # ---- frames ---------------------------------------------------------------

    def _write(self, data: bytes) -> bool:
        """Queue ``data`` for the agent; False (and the connection dropped) when den
        already holds MAX_BUFFERED for it: the guest does not read its port."""
        if self._lost is not None:
            return False
        if self._writer.transport.get_write_buffer_size() > MAX_BUFFERED:
            self._lose("the agent does not read its port")
            return False
        self._writer.write(data)
        return True

    def send_nowait(self, type_: int, ch: int, payload: bytes = b"") -> None:
        """Small control frames (signal, resize, window, close): no waiting for room."""
        self._write(frame(type_, ch, payload))

    async def send(self, type_: int, ch: int, payload: bytes = b"") -> None:
        if not self._write(frame(type_, ch, payload)):
            raise AgentGone(self._lost or "closed")
        try:
            await asyncio.wait_for(self._writer.drain(), SEND_SECONDS)
        except TimeoutError:
            self._lose(f"the agent took nothing from its port for {SEND_SECONDS:g} s")
            raise AgentGone(self._lost or "closed") from None
        except (ConnectionError, OSError) as e:
            self._lose(f"writing to the agent: {e}")
            raise AgentGone(f"writing to the agent: {e}") from None

    def forget(self, ch: int) -> None:
        self._chans.pop(ch, None)

    async def _request(self, type_: int, payload: bytes) -> tuple[_Chan, int]:
        """Open a channel with a request; its answer (OPENED's value or OK) or AgentError."""
        if self._lost is not None:
            raise AgentGone(self._lost)
        if len(payload) > MAX_PAYLOAD:
            raise AgentError(
                f"request of {len(payload)} bytes over the cap of {MAX_PAYLOAD}", errno.E2BIG
            )
        ch = self._next
        self._next = ch + 1 if ch < 0xFFFFFFFF else 1
        chan = _Chan(self, ch)
        self._chans[ch] = chan
        try:
            await self.send(type_, ch, payload)
            value = await asyncio.wait_for(chan.opened, OPEN_SECONDS)
        except TimeoutError:
            chan.close_now()
            raise BackendFailure(
                f"the guest's agent did not answer within {OPEN_SECONDS:g} s"
            ) from None
        except BaseException:
            chan.close_now()
            raise
        return chan, value

    # ---- operations ---------------------------------------------------------------

    async def exec(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        uid: int,
        gid: int,
        groups: list[int],
        tty: Terminal | None = None,
    ) -> AgentExec:
        """Start ``argv`` in the guest as uid/gid/groups in its own session; a PTY
        when ``tty`` is given (all output on stream 1)."""
        chan, pid = await self._request(T_EXEC, exec_payload(argv, env, cwd, uid, gid, groups, tty))
        return AgentExec(chan, pid, tty is not None)

    async def run(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        uid: int,
        gid: int,
        groups: list[int],
        *,
        stdin: bytes = b"",
        timeout: float = 60.0,
        max_output: int = 1 << 20,
    ) -> ExecResult:
        """Run a command to its end: output past ``max_output`` per stream is read
        and dropped; past ``timeout`` (counted from the call: starting it included)
        its process group is killed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            proc = await asyncio.wait_for(self.exec(argv, env, cwd, uid, gid, groups), timeout)
        except TimeoutError:
            raise BackendFailure(
                f"the guest's agent did not start the command within {timeout:g} s"
            ) from None
        out = {1: bytearray(), 2: bytearray()}
        truncated = False
        timed_out = False

        async def feed() -> None:
            with contextlib.suppress(AgentGone):
                if stdin:
                    await proc.write(stdin)
                await proc.close_stdin()

        async def collect() -> ExecExit:
            nonlocal truncated
            while (chunk := await proc.read()) is not None:
                buf = out[chunk[0]]
                room = max_output - len(buf)
                if len(chunk[1]) > room:
                    truncated = True
                buf += chunk[1][: max(room, 0)]
            return await proc.wait()

        feeder = asyncio.ensure_future(feed())
        try:
            try:
                ended = await asyncio.wait_for(collect(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                timed_out = True
                proc.signal(signals.SIGKILL)
                ended = ExecExit(128 + signals.SIGKILL, signals.SIGKILL)
        finally:
            feeder.cancel()
            await proc.close()
        return ExecResult(ended.exit_code, bytes(out[1]), bytes(out[2]), timed_out, truncated)

    async def connect_tcp(self, host: str, port: int) -> socket.socket:
        """A connected stream socket to host:port as seen inside the guest: one end
        of a socketpair whose other end den relays through the agent."""
        payload = struct.pack(">H", port) + _s16(host.encode())
        try:
            chan, _ = await self._request(T_CONNECT, payload)
        except AgentError as e:
            raise OSError(e.errno or errno.EIO, e.message) from None
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        task = asyncio.ensure_future(self._relay(chan, ours))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)
        return theirs

    async def _relay(self, chan: _Chan, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()

        async def upstream() -> None:  # the caller's writes -> the guest
            while True:
                data = await loop.sock_recv(sock, DATA_CHUNK)
                if not data:
                    if chan.gone is None and not chan.closed:
                        await self.send(T_EOF, chan.id, b"\0")
                    return
                if not await chan.send(data):
                    return

        async def downstream() -> None:  # the guest -> the caller
            while True:
                if chan.queue:
                    _, data = chan.take()
                    await loop.sock_sendall(sock, data)
                    continue
                if 1 in chan.ended:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                    return
                if chan.gone is not None or chan.closed:
                    return
                chan.changed.clear()
                await chan.changed.wait()

        up = asyncio.ensure_future(upstream())
        down = asyncio.ensure_future(downstream())
        try:
            # each direction ends with its own EOF; an error in either ends both
            await asyncio.gather(up, down)
        except (OSError, AgentGone):
            pass
        finally:
            for t in (up, down):
                t.cancel()
            chan.close_now()
            sock.close()

    async def _simple(self, type_: int, payload: bytes) -> None:
        chan, _ = await self._request(type_, payload)
        self.forget(chan.id)  # answered: no channel stays open on either side

    async def settime(self) -> None:
        """Set the guest's clock to the host's (after a resume: the guest slept)."""
        await self._simple(T_SETTIME, struct.pack(">Q", time.time_ns()))

    async def ping(self) -> float:
        """A round trip; returns its seconds."""
        t0 = time.monotonic()
        await self._simple(T_PING, os.urandom(8))
        return time.monotonic() - t0

    async def poweroff(self) -> None:
        """Ask the guest to end its processes and power off (the agent answers first)."""
        await self._simple(T_POWEROFF, b"")


__all__ = ["AgentChannel", "AgentError", "AgentExec", "AgentGone"]
