"""The microvm backend against a hostile guest root or member: each ``test_closed_*``
test is an attack a review found working, kept as a guard now that it fails.

Two kinds of attacker:

* root inside a microVM. The guest runs its own kernel, and den's agent is PID 1
  there, but root may ptrace PID 1 or take its virtio-serial descriptor with
  ``pidfd_getfd`` (CAP_SYS_PTRACE), stop it, and then write whatever bytes it
  wants on the port while nobody reads what den sends. So what arrives on
  ``agent.sock`` is the attacker's: the first tests put such a guest at the other
  end of a real :class:`AgentChannel` (a unix socket, as QEMU's chardev serves
  the port), no VM needed.
* a member with a microVM, through den's RPC (one shared busybox microVM, slow).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from den.backends.base import Terminal
from den.backends.microvm import channel as proto
from den.backends.microvm import console as vm_console
from den.backends.microvm.channel import AgentChannel, AgentGone
from den.cli.client import RpcError
from den.errors import BackendFailure, InvalidParams
from tests.conftest import Daemon
from tests.workspaces.conftest import BB, import_bb, make_users, ok, sh, vm_dir

# -- a guest that speaks for the agent -------------------------------------------------

HELLO_HEAD = proto.HEADER.pack(proto.MAGIC, proto.T_HELLO, 0, 0, 20)


def gframe(type_: int, ch: int, payload: bytes = b"") -> bytes:
    body = proto.HEADER.pack(proto.MAGIC, type_, 0, ch, len(payload)) + payload
    return body + struct.pack(">I", zlib.crc32(body))


class HostileGuest:
    """The guest end of the agent port, driven by a guest root who took it over.

    It answers den's HELLO as the agent would (echoing the nonce), then hands
    every later frame from den to ``self.frames`` and lets the test write what
    it likes. ``reading`` False stops it reading the port (the stopped agent)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.frames: asyncio.Queue[tuple[int, int, bytes]] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None
        self.reading = True
        self.server: asyncio.AbstractServer | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        buf = b""
        while (i := buf.find(HELLO_HEAD)) < 0 or len(buf) < i + 12 + 20 + 4:
            chunk = await reader.read(1 << 16)
            if not chunk:
                return
            buf += chunk
        nonce = buf[i + 12 + 4 : i + 12 + 12]
        buf = buf[i + 12 + 20 + 4 :]
        reply = struct.pack(">I", proto.VERSION) + nonce + os.urandom(16)
        writer.write(gframe(proto.T_HELLO, 0, reply + struct.pack(">II", 65536, 64)))
        await writer.drain()
        self.connected.set()
        while True:
            while len(buf) >= 12:
                _m, t, _f, ch, n = proto.HEADER.unpack(buf[:12])
                if len(buf) < 12 + n + 4:
                    break
                self.frames.put_nowait((t, ch, buf[12 : 12 + n]))
                buf = buf[12 + n + 4 :]
            while not self.reading:
                await asyncio.sleep(0.05)
            chunk = await reader.read(1 << 16)
            if not chunk:
                return
            buf += chunk

    async def next(self, type_: int) -> tuple[int, bytes]:
        while True:
            t, ch, payload = await asyncio.wait_for(self.frames.get(), 5)
            if t == type_:
                return ch, payload

    def send(self, type_: int, ch: int, payload: bytes = b"") -> None:
        assert self.writer is not None
        self.writer.write(gframe(type_, ch, payload))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.server is not None:
            self.server.close()


async def with_guest(tmp_path: Path, body: Any) -> None:
    guest = HostileGuest(tmp_path / "agent.sock")
    await guest.start()
    ch = await AgentChannel.open(tmp_path / "agent.sock", 5.0)
    try:
        await asyncio.wait_for(guest.connected.wait(), 5)
        await body(guest, ch)
    finally:
        await guest.close()
        await asyncio.wait_for(ch.close(), 10)


def test_closed_run_timeout_ignored_when_the_guest_never_answers_exec(tmp_path: Path) -> None:
    """AgentChannel.run(timeout=1) waits forever for OPENED: the timeout covers only
    the command's output. den's own jobs (mail delivery holds one of 16 global
    slots, account setup at create, dotfiles, /code) hang on such a guest."""

    async def body(guest: HostileGuest, ch: AgentChannel) -> None:
        t0 = time.monotonic()
        with contextlib.suppress(BackendFailure):
            try:
                await asyncio.wait_for(ch.run(["true"], {}, "/", 0, 0, [], timeout=1.0), 6.0)
            except TimeoutError:
                pytest.fail("run(timeout=1.0) still waits after 6 s: the EXEC was never answered")
        assert time.monotonic() - t0 < 4.0

    asyncio.run(with_guest(tmp_path, body))


def test_closed_window_grants_pile_up_in_the_daemon_when_the_guest_stops_reading(
    tmp_path: Path,
) -> None:
    """Each DATA frame the host consumes is answered with its own WINDOW frame by
    send_nowait (never drained): a guest that sends 1-byte frames and stops reading
    the port makes the daemon buffer 20 bytes per 17 it sends, without bound."""

    async def body(guest: HostileGuest, ch: AgentChannel) -> None:
        started = asyncio.ensure_future(ch.exec(["cat"], {}, "/", 0, 0, []))
        cid, _ = await guest.next(proto.T_EXEC)
        guest.send(proto.T_OPENED, cid, struct.pack(">I", 42))
        proc = await started
        guest.reading = False  # the agent stopped, its port no longer read
        frames = 100_000
        one = gframe(proto.T_DATA, cid, b"x")
        assert guest.writer is not None

        async def flood() -> None:
            for _ in range(frames // 1000):
                guest.writer.write(one * 1000)  # type: ignore[union-attr]
                await guest.writer.drain()  # type: ignore[union-attr]

        async def consume() -> int:
            got = 0
            while got < frames:
                chunk = await proc.read()
                assert chunk is not None
                got += len(chunk[1])
            return got

        await asyncio.wait_for(asyncio.gather(flood(), consume()), 60)
        transport = ch._writer.transport  # what the daemon holds for this guest
        held = transport.get_write_buffer_size()
        assert held < 256 << 10, f"the daemon holds {held >> 10} KiB of unsent WINDOW frames"

    asyncio.run(with_guest(tmp_path, body))


def test_an_agent_that_stops_reading_is_dropped_and_close_does_not_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """den writing to a guest that no longer reads its port: the write gives up
    (SEND_SECONDS, shortened here), the connection is dropped, close() returns."""
    monkeypatch.setattr(proto, "SEND_SECONDS", 1.0)

    async def body(guest: HostileGuest, ch: AgentChannel) -> None:
        procs = []
        for _ in range(12):  # 12 channels x 64 KiB of credit: past the socket's buffer
            started = asyncio.ensure_future(ch.exec(["cat"], {}, "/", 0, 0, []))
            cid, _ = await guest.next(proto.T_EXEC)
            guest.send(proto.T_OPENED, cid, struct.pack(">I", 42))
            procs.append(await started)
        guest.reading = False
        with pytest.raises(AgentGone):
            await asyncio.wait_for(
                asyncio.gather(*(p.write(b"x" * proto.WINDOW_IN) for p in procs)), 10
            )
        assert not ch.alive
        assert ch._writer.transport.get_write_buffer_size() <= proto.MAX_BUFFERED + (80 << 10)
        await asyncio.wait_for(ch.close(), 1.0)

    asyncio.run(with_guest(tmp_path, body))


def test_an_unanswered_request_fails_after_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """exec() (sftp, terminals, streams: no timeout of their own) gives up when the
    agent never answers EXEC: a BackendFailure saying so, not a hang."""
    monkeypatch.setattr(proto, "OPEN_SECONDS", 0.5)

    async def body(guest: HostileGuest, ch: AgentChannel) -> None:
        with pytest.raises(BackendFailure, match="did not answer"):
            await asyncio.wait_for(ch.exec(["true"], {}, "/", 0, 0, []), 5)
        cid, _ = await guest.next(proto.T_EXEC)
        closed, _ = await guest.next(proto.T_CLOSE)  # den let the guest know it gave up
        assert closed == cid

    asyncio.run(with_guest(tmp_path, body))


def test_exec_payload_refuses_what_the_wire_cannot_carry() -> None:
    """ids past 32 bits (or 2^32-1, "no change" to setresuid) are InvalidParams naming
    `user`, not struct.error; a terminal's size is clamped as resize() clamps it."""
    for uid, gid, groups in ((1 << 32, 0, []), (0, (1 << 32) - 1, []), (0, 0, [-1])):
        with pytest.raises(InvalidParams) as info:
            proto.exec_payload(["id"], {}, "/", uid, gid, groups, None)
        assert info.value.data["errors"][0]["field"] == "user"
    with pytest.raises(InvalidParams):
        proto.exec_payload(["id"], {}, "/" + "d" * 70000, 0, 0, [], None)
    payload = proto.exec_payload(["id"], {}, "/", 0, 0, [], Terminal("xterm", 1 << 20, 0))
    assert struct.unpack(">BHH", payload[12:17]) == (1, 0xFFFF, 1)


def test_console_of_a_flooding_guest_is_kept_bounded(tmp_path: Path) -> None:
    """The console reader against a stand-in for QEMU's console socket: a guest
    writing 3 MiB leaves at most head + tail in console.log, the boot log and the
    last lines (a panic) kept; what den shows from it has no escapes."""
    boot = b"den-init: booting\r\n"
    panic = b"\x1b[31mKernel panic - not syncing: \x1b]0;owned\x07the end\x08\r\n"

    async def qemu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(boot)
        for _ in range(48):
            writer.write(b"z" * (64 << 10))
            await writer.drain()
        writer.write(panic)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(qemu, str(tmp_path / "console.sock"))
        try:
            await asyncio.wait_for(vm_console.Console(tmp_path).run(), 30)
        finally:
            server.close()

    asyncio.run(main())
    data = (tmp_path / "console.log").read_bytes()
    assert len(data) <= vm_console.HEAD + vm_console.TAIL + 100, len(data)
    assert data.startswith(boot) and data.endswith(panic)
    assert b"bytes of console output dropped" in data
    shown = vm_console.clean(panic.decode())
    assert shown == "Kernel panic - not syncing: the end", repr(shown)
    # a daemon started again carries on from what the last one kept
    again = vm_console.Console(tmp_path)
    assert again.content().startswith(boot) and again.content().endswith(panic)


# -- a member's microVM, booted for real (TCG: slow) ----------------------------------


@pytest.fixture(scope="module")
def vm(pool_microvm: Daemon) -> Iterator[dict[str, Any]]:
    """One busybox microVM shared by the slow cases (each TCG boot costs seconds)."""
    d = pool_microvm
    import_bb(d)
    with make_users(d) as users:
        owner = users.make()
        ws: dict[str, Any] = d.call(
            "workspace.create",
            name="hostile",
            user=owner,
            image=BB,
            backend="microvm",
            mem="256M",
            cpu=1,
        )
        yield ws


def _qemu_pid(d: Daemon, ws: dict[str, Any]) -> int:
    return int((vm_dir(d, ws["id"]) / "qemu.pid").read_text())


@pytest.mark.slow
def test_closed_guest_console_grows_the_host_disk_without_bound(
    pool_microvm: Daemon, vm: dict[str, Any]
) -> None:
    """The serial console is ``-serial file:console.log``, truncated only at start:
    a guest root writing to /dev/ttyS0 fills the host's data directory (outside
    the workspace's disk quota) for as long as it runs."""
    d = pool_microvm
    log = vm_dir(d, vm["id"]) / "console.log"
    before = log.stat().st_size
    # ~110 KiB/s under TCG here; a real guest writes for as long as it likes
    sh(d, vm["ref"], "head -c 1572864 /dev/zero > /dev/ttyS0", user="root", timeout=240)
    grown = log.stat().st_size - before
    assert log.stat().st_size < 1 << 20, (
        f"console.log is {log.stat().st_size >> 10} KiB after the guest wrote 1.5 MiB "
        f"(+{grown >> 10} KiB): no cap"
    )


@pytest.mark.slow
def test_closed_uid_past_32_bits_is_an_internal_error(
    pool_microvm: Daemon, vm: dict[str, Any]
) -> None:
    """resolve_user passes an all-digit user not in /etc/passwd through as uid:gid,
    and takes uids of up to 10 digits from the workspace's /etc/passwd; the microvm
    packs them as u32 (struct.error): "Internal error", not a clear refusal. The
    passwd is the guest root's: an owner line with such a uid breaks every exec,
    session and mail delivery den makes as that user."""
    d = pool_microvm
    with pytest.raises(RpcError) as info:
        d.call("workspace.exec", ref=vm["ref"], argv=["id"], user="99999999999")
    assert info.value.code == -32602, ("a user param", info.value.code, info.value.message)
    ok(d, vm["ref"], "echo 'huge:x:4294967296:0::/:/bin/sh' >> /etc/passwd", user="root")
    try:
        res = sh(d, vm["ref"], "id -u", user="huge")
        assert res["exit_code"] != 0, res  # a clear failure is fine
    except RpcError as err:
        assert err.code != -32603, ("a passwd line", err.code, err.message)
    finally:
        ok(d, vm["ref"], "sed -i '/^huge:/d' /etc/passwd", user="root")


@pytest.mark.slow
def test_qemu_does_not_run_as_host_root(pool_microvm: Daemon, vm: dict[str, Any]) -> None:
    """Guard (passes since K2's unprivileged QEMU): QEMU emulates an untrusted guest
    (TCG, virtio devices, the serial port); as uid 0 with every capability one
    device bug would be host root."""
    pid = _qemu_pid(pool_microvm, vm)
    status = Path(f"/proc/{pid}/status").read_text()
    uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
    cap_eff = next(ln for ln in status.splitlines() if ln.startswith("CapEff:")).split()[1]
    assert "0" not in uids and int(cap_eff, 16) == 0, (uids, cap_eff)


@pytest.mark.slow
def test_guest_root_cannot_make_device_nodes_on_the_host(
    pool_microvm: Daemon, vm: dict[str, Any]
) -> None:
    """Guard (passes): virtiofsd's modcaps=-mknod keeps device nodes off the host."""
    d = pool_microvm
    res = sh(d, vm["ref"], "mknod /hostile-null c 1 3", user="root")
    assert res["exit_code"] != 0, res
    assert ok(d, vm["ref"], "test -e /hostile-null && echo there || echo none", user="root") == (
        "none\n"
    )
