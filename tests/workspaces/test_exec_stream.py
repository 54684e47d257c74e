"""Streaming exec: ``GET /v1/exec`` (den.web.execws), ``workspace.exec_stream`` and
``den exec``, against the real daemon and a busybox workspace.

Clients are den's own (den.cli.execstream.stream, the ``den`` CLI) and a bare
aiohttp websocket where a test drives the framing itself.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from den.cli.client import RpcError
from den.cli.execstream import stream, ws_url
from tests.conftest import DEN, Daemon
from tests.workspaces.conftest import create, make_users, ok, wait_for

MB = 1_000_000


@dataclass
class Env:
    d: Daemon
    ref: str  # OWNER/NAME, the owner's workspace
    owner_token: str
    other_token: str


@pytest.fixture(scope="module")
def env(pool_daemon: Daemon, bb_image: str) -> Iterator[Env]:
    with make_users(pool_daemon) as users:
        owner, other = users.make(), users.make()
        ws = create(pool_daemon, owner, "strm", image=bb_image)
        tokens = [
            pool_daemon.call("token.create", user=u, right="write")["token"] for u in (owner, other)
        ]
        yield Env(pool_daemon, ws["ref"], *tokens)


class Recorder:
    """A binary stream that notes when each write arrived."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.size = 0
        self.keep = True

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.keep:
            self.chunks.append((time.monotonic(), bytes(data)))
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def data(self) -> bytes:
        return b"".join(c for _, c in self.chunks)


def run_stream(
    e: Env, argv: list[str], stdin: Any = None, **kw: Any
) -> tuple[dict[str, Any], Recorder, Recorder]:
    out, err = Recorder(), Recorder()
    end = asyncio.run(
        stream(
            {"ref": e.ref, "argv": argv, **kw},
            url=e.d.http_url,
            token=e.owner_token,
            stdin=stdin,
            stdout=out,  # type: ignore[arg-type]
            stderr=err,  # type: ignore[arg-type]
        )
    )
    return end, out, err


def test_lines_arrive_as_they_are_printed(env: Env) -> None:
    start = time.monotonic()
    end, out, err = run_stream(
        env, ["sh", "-c", "for i in 1 2 3; do echo line$i; sleep 1; done; echo bye >&2"]
    )
    assert end == {"exit_code": 0, "signal": None, "timed_out": False}
    assert out.data == b"line1\nline2\nline3\n" and err.data == b"bye\n"
    lines = [(t - start, c) for t, c in out.chunks]
    assert len(lines) == 3, lines  # one at a time, not together at the end
    # line1 came at once; line3 two seconds later: spread, as printed.
    assert lines[2][0] - lines[0][0] > 1.5, lines
    assert err.chunks[0][0] - lines[0][0] > 2.5


def test_stdin_round_trips_binary(env: Env) -> None:
    blob = os.urandom(3 * MB)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as f:
            f.write(blob)

    threading.Thread(target=feed, daemon=True).start()
    with os.fdopen(r, "rb") as stdin:
        end, out, err = run_stream(env, ["sh", "-c", "cat; echo done >&2"], stdin=stdin)
    assert end["exit_code"] == 0, err.data
    assert out.data == blob and err.data == b"done\n"


def test_exit_code_and_signal(env: Env) -> None:
    assert run_stream(env, ["sh", "-c", "exit 7"])[0]["exit_code"] == 7
    end = run_stream(env, ["sh", "-c", "kill -TERM $$"])[0]
    assert end == {"exit_code": 143, "signal": "TERM", "timed_out": False}
    end, _, err = run_stream(env, ["no-such-program"])
    assert end["exit_code"] == 127 and err.data, err.data
    end = run_stream(env, ["sleep", "30"], timeout=1)[0]
    assert end == {"exit_code": 137, "signal": "KILL", "timed_out": True}


async def _open(
    e: Env, argv: list[str], token: str | None = None
) -> tuple[aiohttp.ClientSession, Any]:
    session = aiohttp.ClientSession()
    headers = {"Authorization": f"Bearer {token or e.owner_token}"}
    sock = await session.ws_connect(ws_url(e.d.http_url), headers=headers)
    await sock.send_str(orjson.dumps({"ref": e.ref, "argv": argv}).decode())
    return session, sock


def _running(e: Env, marker: str) -> bool:
    return marker in ok(e.d, e.ref, "ps -o args")


def test_signal_and_closed_websocket_kill_it(env: Env) -> None:
    async def by_signal() -> dict[str, Any]:
        session, sock = await _open(env, ["sh", "-c", "echo up; exec sleep 987"])
        async with session, sock:
            assert (await sock.receive()).data == b"\x01up\n"
            assert _running(env, "sleep 987")
            await sock.send_str('{"signal": "INT"}')
            return dict(orjson.loads((await sock.receive(timeout=10)).data))

    assert asyncio.run(by_signal()) == {"exit_code": 130, "signal": "INT", "timed_out": False}
    assert not _running(env, "sleep 987")

    async def by_close() -> None:
        session, sock = await _open(env, ["sh", "-c", "echo up; exec sleep 986"])
        async with session:
            assert (await sock.receive()).data == b"\x01up\n"
            assert _running(env, "sleep 986")
            await sock.close()

    asyncio.run(by_close())
    assert wait_for(lambda: not _running(env, "sleep 986"), timeout=10)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_100mb_streams_with_flat_daemon_memory(env: Env) -> None:
    assert env.d.proc is not None
    pid = env.d.proc.pid
    run_stream(env, ["true"])  # warm: the first exec's imports and buffers
    base = peak = _rss_kib(pid)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, _rss_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    async def slow_then_fast() -> tuple[int, bool]:
        session, sock = await _open(env, ["head", "-c", str(100 * MB), "/dev/zero"])
        async with session, sock:
            await asyncio.sleep(1.5)  # a client that does not read: the command must wait
            held_back = _rss_kib(pid) - base < 40_000
            size = 0
            while True:
                msg = await sock.receive(timeout=60)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    size += len(msg.data) - 1
                else:
                    assert orjson.loads(msg.data)["exit_code"] == 0
                    return size, held_back

    try:
        size, held_back = asyncio.run(slow_then_fast())
    finally:
        done.set()
        sampler.join()
    assert size == 100 * MB and held_back
    grown_mib = (peak - base) / 1024
    assert grown_mib < 40, f"the daemon grew by {grown_mib:.1f} MiB streaming 100 MB"


def test_member_cannot_stream_in_anothers_workspace(env: Env) -> None:
    with pytest.raises(RpcError) as info:
        asyncio.run(
            stream({"ref": env.ref, "argv": ["true"]}, url=env.d.http_url, token=env.other_token)
        )
    # Not found, as for any call: another's workspace is not even confirmed to exist.
    assert info.value.code == -32001 and "no workspace" in info.value.message, info.value


def test_unauthenticated_and_plain_rpc_refused(env: Env) -> None:
    async def anonymous() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                await session.ws_connect(ws_url(env.d.http_url))
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
        return 0

    assert asyncio.run(anonymous()) == 401
    with pytest.raises(RpcError) as info:
        asyncio.run(stream({"ref": env.ref, "argv": ["true"]}, url=env.d.http_url, token="den_x_y"))
    assert info.value.code == -32006
    err = env.d.error("workspace.exec_stream", ref=env.ref, argv=["true"])
    assert "/v1/exec" in err.message
    doc = env.d.call("rpc.discover")
    method = next(m for m in doc["methods"] if m["name"] == "workspace.exec_stream")
    assert "/v1/exec" in method["description"] and "exit_code" in method["description"]


def test_den_exec_streams_and_returns_the_code(env: Env) -> None:
    # Over the unix socket as root, as an admin runs it.
    p = subprocess.Popen(
        [DEN, "exec", env.ref, "--", "sh", "-c", "echo first; sleep 2; echo second >&2; exit 3"],
        env=env.d.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    start = time.monotonic()
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline() == b"first\n"
    first_at = time.monotonic() - start
    assert p.wait(30) == 3
    assert p.stderr.read() == b"second\n"
    assert first_at < 1.8, first_at  # printed before the command ended
    # stdin from a pipe, binary-safe; --json keeps the non-streaming call.
    blob = bytes(range(256)) * 1000
    res = subprocess.run(
        [DEN, "exec", env.ref, "--", "cat"],
        env=env.d.env,
        input=blob,
        capture_output=True,
        timeout=30,
    )
    assert res.returncode == 0 and res.stdout == blob, res.stderr
    res = subprocess.run(
        [DEN, "exec", "--json", env.ref, "--", "sh", "-c", "echo hi; exit 4"],
        env=env.d.env,
        capture_output=True,
        timeout=30,
    )
    assert (
        orjson.loads(res.stdout)["stdout"] == "hi\n" and orjson.loads(res.stdout)["exit_code"] == 4
    )
