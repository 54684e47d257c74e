"""What a tenant's forwarding may cost the daemon (den.ssh.limits): nothing is
buffered for a channel the client has not confirmed, connections made inside
past a listener's limit are closed at once, and the host processes that make
sockets inside are bounded per user.

The tenant controls its client, so these tests use asyncssh as a client that
does what OpenSSH's would not: never confirm a channel, accept channels without
end, open many at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from den.backends import cgroups
from den.ssh import limits, streamlocal
from tests.conftest import Daemon
from tests.ssh.conftest import Person, make_ws


async def connect(p: Person, login: str) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        p.port,
        username=login,
        client_keys=[str(p.key)],
        known_hosts=None,
        agent_path=None,
    )


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def daemon_pid(d: Daemon) -> int:
    assert d.proc is not None
    return d.proc.pid


async def listen(conn: asyncssh.SSHClientConnection, kind: str, factory: Callable[..., Any]) -> str:
    """``ssh -R`` of a path or of a port inside; returns what to connect to there."""
    if kind == "unix":
        await conn.create_unix_server(factory, "/tmp/fwd.sock")
        return "/tmp/fwd.sock"
    listener = await conn.create_server(factory, "localhost", 0)
    return f"127.0.0.1:{listener.get_port()}"


# Inside: connect to argv[1] (a path, or HOST:PORT) and send argv[2] MiB, noting
# progress in /tmp/flood.log, then "sent", or how the connection ended.
FLOOD = """
import socket, sys
to, mib = sys.argv[1], int(sys.argv[2])
if to.startswith("/"):
    c = socket.socket(socket.AF_UNIX); c.connect(to)
else:
    h, _, p = to.rpartition(":"); c = socket.create_connection((h, int(p)))
block = bytes(1 << 20)
log = open("/tmp/flood.log", "w", buffering=1)
try:
    for i in range(mib):
        c.sendall(block)
        log.write("mib %d\\n" % (i + 1))
    log.write("sent\\n")
except OSError as e:
    log.write("closed %s\\n" % e)
"""


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_an_unconfirmed_channel_buffers_nothing(
    alice: Person, dev_image: str, pool_daemon: Daemon, kind: str
) -> None:
    """A workspace writing into a forwarded connection whose channel its client
    never confirms: the writer blocks (the daemon reads nothing, holds nothing),
    and the connection inside is closed after ssh_forward_open_seconds."""
    ws = make_ws(alice, image=dev_image)
    pid = daemon_pid(pool_daemon)
    mib = 200
    got: dict[str, Any] = {}

    async def attack() -> None:
        conn = await connect(alice, ws)
        stall = asyncio.Event()

        async def never(*_: Any) -> asyncssh.SSHUNIXSession[bytes]:
            await stall.wait()  # the channel is never confirmed
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "no")

        try:
            to = await listen(conn, kind, never)
            await conn.run(f"cat > /tmp/flood.py <<'EOF'\n{FLOOD}EOF", check=True)
            got["before"] = rss_mib(pid)
            await conn.run(
                f"setsid python3 /tmp/flood.py {to} {mib} </dev/null >/dev/null 2>&1 &", check=True
            )
            await asyncio.sleep(8)
            got["after"] = rss_mib(pid)
            got["progress"] = (await conn.run("tail -1 /tmp/flood.log")).stdout
            opening = float(pool_daemon.env.get("DEN_SSH_FORWARD_OPEN_SECONDS", "30"))
            deadline = time.monotonic() + opening + 30
            while time.monotonic() < deadline:
                got["end"] = str((await conn.run("tail -1 /tmp/flood.log")).stdout)
                if "closed" in got["end"] or "sent" in got["end"]:
                    break
                await asyncio.sleep(1)
        finally:
            stall.set()
            conn.close()
            await conn.wait_closed()

    asyncio.run(attack())
    grew = got["after"] - got["before"]
    assert grew < 48, f"the daemon grew {grew:.0f} MiB for a channel never confirmed: {got}"
    assert "sent" not in got["progress"], got  # the writer was held back
    assert "closed" in got["end"], got  # ... and let go when the open timed out


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_connections_past_a_listener_limit_close_at_once(
    alice: Person, bob: Person, dev_image: str, bb_image: str, pool_daemon: Daemon, kind: str
) -> None:
    """Connections made inside to an ``ssh -R`` listener whose client takes every
    channel: past RELAYS_PER_LISTENER they are closed at once and cost the daemon
    nothing, while the connection and other tenants keep working."""
    ws = make_ws(alice, image=dev_image)
    bob_ws = make_ws(bob, image=bb_image)
    pid = daemon_pid(pool_daemon)
    many = limits.RELAYS_PER_LISTENER + 150
    # Inside: open `many` connections and hold them; then say how many are still open.
    hold_many = (
        "import socket, sys, time\n"
        "to, n = sys.argv[1], int(sys.argv[2])\n"
        "def one():\n"
        "    if to.startswith('/'):\n"
        "        c = socket.socket(socket.AF_UNIX); c.connect(to); return c\n"
        "    h, _, p = to.rpartition(':'); return socket.create_connection((h, int(p)))\n"
        "held = [one() for _ in range(n)]\n"
        "time.sleep(3)\n"
        "closed = 0\n"
        "for c in held:\n"
        "    c.setblocking(False)\n"
        "    try:\n"
        "        closed += c.recv(1) == b''\n"
        "    except BlockingIOError:\n"
        "        pass\n"
        "    except OSError:\n"
        "        closed += 1\n"
        "print(n - closed, closed, flush=True)\n"
        "time.sleep(600)\n"
    )
    got: dict[str, Any] = {}

    async def attack() -> None:
        conn = await connect(alice, ws)
        channels: list[Any] = []

        class Sink(asyncssh.SSHTCPSession[bytes]):
            def connection_made(self, chan: Any) -> None:
                channels.append(chan)  # taken, never answered

        try:
            to = await listen(conn, kind, lambda *_: Sink())
            await conn.run(f"cat > /tmp/many.py <<'EOF'\n{hold_many}EOF", check=True)
            got["before"] = open_fds(pid)
            proc = await conn.create_process(f"python3 /tmp/many.py {to} {many}")
            line = await asyncio.wait_for(proc.stdout.readline(), 120)
            got["open"], got["closed"] = (int(x) for x in str(line).split())
            got["after"] = open_fds(pid)
            got["channels"] = len(channels)
            # The same connection still runs commands; another tenant still gets in.
            got["same"] = (await conn.run("echo still here")).stdout
            res = await asyncio.to_thread(bob.ssh, bob_ws, "echo bob in")
            got["bob"] = res.stdout
            proc.close()
        finally:
            conn.close()
            await conn.wait_closed()

    asyncio.run(attack())
    cap = limits.RELAYS_PER_LISTENER
    assert got["open"] == cap and got["closed"] == many - cap, got
    assert got["after"] - got["before"] <= cap + 40, got
    assert got["channels"] <= cap, got
    assert got["same"] == "still here\n" and got["bob"] == "bob in\n", got
    # With the connection gone, the daemon's descriptors are back.
    deadline = time.monotonic() + 20
    while open_fds(pid) > got["before"] + 20:
        assert time.monotonic() < deadline, (open_fds(pid), got)
        time.sleep(0.5)


def socket_workers(parent: int) -> int:
    """How many of den's socket workers ``parent`` runs now."""
    n = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if b"den.ssh.socket_worker" in cmd and int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            n += 1
    return n


# Inside: a socket whose backlog is full, so that a connect to it waits (as long
# as the worker lets it: CONNECT_TIMEOUT).
def test_socket_workers_per_user_are_bounded(
    alice: Person, dev_image: str, pool_daemon: Daemon
) -> None:
    """Many ``ssh -L`` channels to a path at once: at most WORKERS_PER_USER host
    workers run, WORKERS_WAITING more wait, the rest are refused at once saying
    why. The workspace's cgroup is frozen behind den's back so that each worker
    stops where it joins the workspace and holds its turn: the counts are exact,
    whatever the machine's speed."""
    ws = make_ws(alice, image=dev_image)
    ws_id = alice.d.call("workspace.get", ref=f"{alice.name}/{ws}")["id"]
    group = f"/den{pool_daemon.instance}/{ws_id}"
    pid = daemon_pid(pool_daemon)
    admitted = streamlocal.WORKERS_PER_USER + streamlocal.WORKERS_WAITING
    n = admitted + 20

    async def flood() -> tuple[list[Any], int, bool, list[Any]]:
        conn = await connect(alice, ws)
        try:
            opens = [
                asyncio.ensure_future(conn.open_unix_connection("/tmp/none.sock")) for _ in range(n)
            ]
            cgroups.freeze(group)
            try:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if sum(o.done() for o in opens) >= n - admitted and (
                        socket_workers(pid) >= streamlocal.WORKERS_PER_USER
                    ):
                        break
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # a worker past the limit would show by now
                early = [o.exception() for o in opens if o.done()]
                held = socket_workers(pid)
                # Frozen still, so frozen throughout: only a reconciler pass thaws
                # it (a workspace it finds frozen but not suspended), never again.
                frozen = cgroups.is_frozen(group)
            finally:
                cgroups.thaw(group)
            rest = await asyncio.gather(*opens, return_exceptions=True)
            return early, held, frozen, rest
        finally:
            conn.close()
            await conn.wait_closed()

    for _ in range(3):
        early, held, frozen, rest = asyncio.run(flood())
        if frozen:
            break
    assert frozen, "den's reconciler thawed the workspace in each of three tries"
    busy = [
        r
        for r in early
        if isinstance(r, asyncssh.ChannelOpenError)
        and r.code == asyncssh.OPEN_RESOURCE_SHORTAGE
        and f"{streamlocal.WORKERS_PER_USER} socket workers are running for {alice.name}"
        in r.reason
    ]
    assert len(early) == n - admitted and len(busy) == n - admitted, [str(r) for r in early]
    assert held == streamlocal.WORKERS_PER_USER
    # Thawed, the held and waiting workers all run in turn and say what failed.
    told = [r for r in rest if isinstance(r, asyncssh.ChannelOpenError)]
    assert len(told) == n, [str(r) for r in rest]
    assert sum("cannot connect on /tmp/none.sock" in r.reason for r in told) == admitted
