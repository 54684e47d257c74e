"""den's guest agent (den-agent.c) driven through its host client (AgentChannel).

The agent is built here as the guest gets it (static) and runs on the host as an
ordinary process on a listening unix socket, as QEMU's chardev serves it: no VM,
so these are fast. It is then a child subreaper, and settime/poweroff are refused
(they would act on the host); the microVM backend's tests boot it for real.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from den.backends.base import ExecExit, Terminal
from den.backends.microvm import channel as proto
from den.backends.microvm.channel import AgentChannel, AgentError

SRC = Path(__file__).parents[2] / "src/den/backends/microvm/agent/den-agent.c"
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def agent_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("agent") / "den-agent"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SRC)],
        check=True,
    )
    return out


class Agent:
    def __init__(self, binary: Path, sock: Path) -> None:
        self.sock = sock
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(sock))
        lsock.listen(1)
        try:
            self.proc = subprocess.Popen(
                [str(binary), "--fd", str(lsock.fileno())],
                pass_fds=[lsock.fileno()],
                stderr=subprocess.DEVNULL,
            )
        finally:
            lsock.close()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def children(self) -> list[tuple[int, str]]:
        """(pid, state) of the agent's child processes."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) == self.proc.pid:
                found.append((int(entry), fields[0]))
        return found

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


@pytest.fixture
def agent(agent_bin: Path, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(agent_bin, tmp_path / "agent.sock")
    try:
        yield a
    finally:
        a.proc.terminate()  # not PID 1: it kills its commands and exits
        try:
            a.proc.wait(10)
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def drain(stream: proto.AgentExec) -> dict[int, bytes]:
    out = {1: b"", 2: b""}
    while (chunk := await stream.read()) is not None:
        out[chunk[0]] += chunk[1]
    return out


def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_exec_exit_codes_signals_and_ids(agent: Agent) -> None:
    async def go() -> None:
        ch = await AgentChannel.open(agent.sock, 10)
        try:
            r = await ch.run(["sh", "-c", "echo out; echo err >&2; exit 3"], ENV, "/", 0, 0, [])
            assert (r.exit_code, r.stdout, r.stderr) == (3, b"out\n", b"err\n")
            r = await ch.run(["sh", "-c", "kill -9 $$"], ENV, "/", 0, 0, [])
            assert r.exit_code == 137
            r = await ch.run(["no-such-command"], ENV, "/", 0, 0, [])
            assert r.exit_code == 127 and b"no-such-command" in r.stderr
            r = await ch.run(["pwd"], ENV, "/no/such/dir", 0, 0, [])
            assert r.exit_code == 127 and b"chdir" in r.stderr
            # the ids and groups asked for, and the environment as given
            r = await ch.run(
                ["sh", "-c", 'id -u; id -g; id -G; echo "$FOO"'],
                {**ENV, "FOO": "bar baz"},
                "/tmp",
                65534,
                65534,
                [100, 65534],
            )
            assert r.stdout.decode().split("\n")[:4] == ["65534", "65534", "65534 100", "bar baz"]
            # a signal reaches the command's whole process group, and is reported
            s = await ch.exec(["sh", "-c", "sleep 100 & echo $!; wait"], ENV, "/", 0, 0, [])
            first = await s.read()
            assert first is not None
            bg = int(first[1].split()[0])
            s.signal(signal.SIGTERM)
            assert await s.wait() == ExecExit(128 + signal.SIGTERM, signal.SIGTERM)
            assert gone(bg)
            await s.close()
            # timeout kills the command, and says so
            r = await ch.run(["sleep", "100"], ENV, "/", 0, 0, [], timeout=0.5)
            assert r.timed_out
            # max_output keeps that much and says it dropped the rest
            r = await ch.run(
                ["head", "-c", "100000", "/dev/zero"], ENV, "/", 0, 0, [], max_output=1000
            )
            assert (len(r.stdout), r.truncated, r.exit_code) == (1000, True, 0)
        finally:
            await ch.close()

    run(go())


def test_stdin_and_eof(agent: Agent) -> None:
    data = os.urandom(700_000)  # ten times the agent's window for stdin

    async def go() -> None:
        ch = await AgentChannel.open(agent.sock, 10)
        try:
            r = await ch.run(["sha256sum"], ENV, "/", 0, 0, [], stdin=data)
            import hashlib

            assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
            # the command ends when its input ends, not before
            s = await ch.exec(["cat"], ENV, "/", 0, 0, [])
            await s.write(b"one ")
            await s.write(b"two")
            await s.close_stdin()
            assert (await drain(s))[1] == b"one two"
            assert await s.wait() == ExecExit(0)
            await s.close()
            # input to a command that closed its stdin is dropped, never a hang
            s = await ch.exec(["sh", "-c", "exec 0<&-; sleep 0.2; echo done"], ENV, "/", 0, 0, [])
            await s.write(os.urandom(300_000))
            assert (await drain(s))[1] == b"done\n"
            await s.close()
        finally:
            await ch.close()

    run(go())


def test_large_output_slow_reader_does_not_block_others(agent: Agent) -> None:
    size = 10_000_000

    async def go() -> None:
        ch = await AgentChannel.open(agent.sock, 10)
        try:
            big = await ch.exec(["head", "-c", str(size), "/dev/zero"], ENV, "/", 0, 0, [])
            await asyncio.sleep(0.3)  # nobody reads it: it stops at its window
            t0 = time.monotonic()
            for _ in range(5):
                r = await ch.run(["echo", "ok"], ENV, "/", 0, 0, [])
                assert r.stdout == b"ok\n"
            assert time.monotonic() - t0 < 5
            assert not big._c.exited.done()  # still blocked on its full pipe
            rss = agent.rss_kb()
            total = 0
            while (chunk := await big.read()) is not None:
                total += len(chunk[1])
                assert big._c.held <= proto.WINDOW_OUT
                rss = max(rss, agent.rss_kb()) if total % (1 << 20) < 40000 else rss
            assert total == size
            assert await big.wait() == ExecExit(0)
            assert rss < 16_000  # the agent's buffers are fixed, whatever flows through it
            await big.close()
        finally:
            await ch.close()

    run(go())


def test_pty_and_resize(agent: Agent) -> None:
    async def go() -> None:
        ch = await AgentChannel.open(agent.sock, 10)
        try:
            s = await ch.exec(
                ["sh", "-c", 'tty >/dev/null && echo "$TERM"; stty size; read x; stty size'],
                ENV,
                "/",
                0,
                0,
                [],
                Terminal("vt100", 100, 30),
            )
            out = b""
            while b"30 100" not in out:
                chunk = await s.read()
                assert chunk is not None and chunk[0] == 1
                out += chunk[1]
            assert b"vt100" in out
            s.resize(120, 40)
            await s.write(b"\n")
            out = (await drain(s))[1]
            assert b"40 120" in out
            assert await s.wait() == ExecExit(0)
            await s.close()
            # ^C on the terminal interrupts its foreground command
            s = await ch.exec(["sleep", "100"], ENV, "/", 0, 0, [], Terminal())
            await asyncio.sleep(0.2)
            await s.write(b"\x03")
            assert await s.wait() == ExecExit(128 + signal.SIGINT, signal.SIGINT)
            await s.close()
        finally:
            await ch.close()

    run(go())


def test_tcp_connect_half_close_and_refused(agent: Agent) -> None:
    async def go() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = await r.read()  # until the client's EOF
            w.write(data.upper() + b" bye")
            await w.drain()
            w.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        ch = await AgentChannel.open(agent.sock, 10)
        loop = asyncio.get_running_loop()
        try:
            sock = await ch.connect_tcp("127.0.0.1", port)
            payload = os.urandom(200_000).hex().encode()[:300_000]
            await loop.sock_sendall(sock, payload)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := await loop.sock_recv(sock, 65536):
                got += chunk
            assert got == payload.upper() + b" bye"
            sock.close()
            with pytest.raises(ConnectionRefusedError):
                await ch.connect_tcp("127.0.0.1", free_port())
            with pytest.raises(OSError) as e:
                await ch.connect_tcp("not-an-address", 80)
            assert e.value.errno == errno.EINVAL
            assert await ch.ping() < 1
        finally:
            await ch.close()
            srv.close()

    run(go())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


def test_channel_cap_and_reaping(agent: Agent) -> None:
    async def go() -> None:
        ch = await AgentChannel.open(agent.sock, 10)
        try:
            streams = [await ch.exec(["sleep", "100"], ENV, "/", 0, 0, []) for _ in range(64)]
            with pytest.raises(AgentError) as e:
                await ch.exec(["true"], ENV, "/", 0, 0, [])
            assert e.value.errno == errno.EMFILE
            for s in streams:
                await s.close()
            assert all(gone(s.pid) for s in streams)
            # orphans a command leaves are reaped: no zombie stays
            r = await ch.run(["sh", "-c", "sleep 0.2 & sleep 0.1 & exit 0"], ENV, "/", 0, 0, [])
            assert r.exit_code == 0
            deadline = time.monotonic() + 5
            while agent.children() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert agent.children() == []
            with pytest.raises(AgentError) as e:  # the host's clock is never the harness's to set
                await ch.settime()
            assert e.value.errno == errno.EPERM
        finally:
            await ch.close()

    run(go())


def test_reconnect_resets_channels(agent: Agent) -> None:
    async def go() -> None:
        first = await AgentChannel.open(agent.sock, 10)
        s = await first.exec(["sleep", "1000"], ENV, "/", 0, 0, [])
        boot = first.boot_id
        await first.close()  # the daemon goes away...
        assert gone(s.pid)  # ...and the agent ends what it ran for it
        second = await AgentChannel.open(agent.sock, 10)
        try:
            assert second.boot_id == boot
            r = await second.run(["echo", "again"], ENV, "/", 0, 0, [])
            assert r.stdout == b"again\n"
        finally:
            await second.close()
        # a second hello on one connection ends the first session's commands too
        raw = await Raw.open(agent.sock)
        raw.send(
            proto.frame(
                proto.T_EXEC, 1, proto.exec_payload(["sleep", "1000"], ENV, "/", 0, 0, [], None)
            )
        )
        type_, _, payload = await raw.frame()
        assert type_ == proto.T_OPENED
        version, _, _ = await AgentChannel._hello(raw.r, raw.w)
        assert version == proto.VERSION
        assert gone(struct.unpack(">I", payload)[0])
        raw.w.close()

    run(go())


class Raw:
    """A hand-driven connection, to send what den's client never would."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer

    @classmethod
    async def open(cls, sock: Path) -> Raw:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        await AgentChannel._hello(reader, writer)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.w.write(data)

    async def frame(self, skip_window: bool = True) -> tuple[int, int, bytes]:
        while True:
            head = await self.r.readexactly(proto.HEADER.size)
            magic, type_, _, ch, length = proto.HEADER.unpack(head)
            assert magic == proto.MAGIC
            rest = await self.r.readexactly(length + 4)
            if ch == 0 and type_ == proto.T_HELLO:
                continue  # a duplicate reply to the hello
            if skip_window and type_ == proto.T_WINDOW:
                continue
            return type_, ch, rest[:length]

    async def error(self) -> tuple[int, int, str]:
        type_, ch, payload = await self.frame()
        assert type_ == proto.T_ERROR, (type_, payload)
        return ch, struct.unpack(">I", payload[:4])[0], payload[4:].decode()


def test_hostile_frames_get_errors_and_the_agent_lives_on(agent: Agent) -> None:
    async def go() -> None:
        raw = await Raw.open(agent.sock)
        raw.send(proto.frame(99, 5, b"x"))
        assert await raw.error() == (5, errno.EINVAL, "unknown frame type 99")
        raw.send(proto.frame(proto.T_PING, 0))
        ch, err, _ = await raw.error()
        assert (ch, err) == (0, errno.EINVAL)
        raw.send(proto.frame(proto.T_EXEC, 6, bytes(13) + b"\xff\xffgarbage"))
        assert (await raw.error())[:2] == (6, errno.EINVAL)
        # argv and groups past the agent's bounds
        huge = proto.exec_payload(["x"] * 5000, {}, "/", 0, 0, [], None)
        raw.send(proto.frame(proto.T_EXEC, 7, huge))
        assert (await raw.error())[:2] == (7, errno.E2BIG)
        groups = proto.exec_payload(["true"], {}, "/", 0, 0, list(range(300)), None)
        raw.send(proto.frame(proto.T_EXEC, 8, groups))
        assert (await raw.error())[:2] == (8, errno.E2BIG)
        # a NUL inside a string
        raw.send(
            proto.frame(proto.T_EXEC, 9, proto.exec_payload(["a\0b"], {}, "/", 0, 0, [], None))
        )
        assert (await raw.error())[:2] == (9, errno.EINVAL)
        # a channel id in use; data past the window
        raw.send(
            proto.frame(
                proto.T_EXEC, 10, proto.exec_payload(["sleep", "100"], ENV, "/", 0, 0, [], None)
            )
        )
        type_, ch, payload = await raw.frame()
        assert (type_, ch) == (proto.T_OPENED, 10)
        pid = struct.unpack(">I", payload)[0]
        raw.send(
            proto.frame(proto.T_EXEC, 10, proto.exec_payload(["true"], ENV, "/", 0, 0, [], None))
        )
        assert (await raw.error())[:2] == (10, errno.EEXIST)
        raw.send(
            proto.frame(proto.T_DATA, 10, bytes(60000)) * 3  # sleep reads nothing: past its window
        )
        assert (await raw.error())[:2] == (10, errno.EPROTO)
        # a frame over the cap: an error, the session ends (its command with it)
        raw.send(proto.HEADER.pack(proto.MAGIC, proto.T_DATA, 0, 10, 1 << 30) + bytes(100))
        ch, err, msg = await raw.error()
        assert (ch, err) == (0, errno.EMSGSIZE) and "over the cap" in msg
        assert gone(pid)
        raw.w.close()
        # a bad checksum likewise
        raw = await Raw.open(agent.sock)
        bad = bytearray(proto.frame(proto.T_PING, 3, b"hi"))
        bad[-1] ^= 0xFF
        raw.send(bytes(bad))
        assert (await raw.error())[:2] == (0, errno.EPROTO)
        raw.w.close()
        # a connection that starts inside half a frame of an earlier one (a guest paused
        # through a daemon restart never sees the hang-up): den's hello still gets through
        reader, writer = await asyncio.open_unix_connection(str(agent.sock))
        await AgentChannel._hello(reader, writer)
        writer.write(proto.frame(proto.T_DATA, 1, bytes(1000))[:500])
        await AgentChannel._hello(reader, writer)
        writer.close()
        assert agent.alive()
        ch2 = await AgentChannel.open(agent.sock, 10)
        try:
            r = await ch2.run(["echo", "alive"], ENV, "/", 0, 0, [])
            assert r.stdout == b"alive\n"
            with pytest.raises(AgentError) as e:  # den's own client refuses what cannot fit a frame
                await ch2.exec(["x" * 70000], ENV, "/", 0, 0, [])
            assert e.value.errno == errno.E2BIG
        finally:
            await ch2.close()

    run(go())


def test_client_drops_a_guest_that_breaks_the_protocol(tmp_path: Path) -> None:
    """What the guest sends is untrusted: a frame over the cap ends the connection, not den."""

    async def go() -> None:
        async def evil(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = b""
            want = proto.HEADER.pack(proto.MAGIC, proto.T_HELLO, 0, 0, 20)
            while (i := data.find(want)) < 0 or len(data) < i + 36:
                data += await r.read(65536)
            nonce = data[i + 16 : i + 24]
            reply = (
                struct.pack(">I", proto.VERSION) + nonce + bytes(16) + struct.pack(">II", 65536, 64)
            )
            w.write(proto.frame(proto.T_HELLO, 0, reply))
            w.write(proto.HEADER.pack(proto.MAGIC, proto.T_DATA, 0, 1, 1 << 31))
            await w.drain()
            await asyncio.sleep(5)
            w.close()

        path = tmp_path / "evil.sock"
        srv = await asyncio.start_unix_server(evil, str(path))
        try:
            ch = await AgentChannel.open(path, 5)
            deadline = time.monotonic() + 5
            while ch.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not ch.alive
            with pytest.raises(proto.AgentGone):
                await ch.ping()
            await ch.close()
        finally:
            srv.close()

    run(go())
