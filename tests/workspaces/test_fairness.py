"""No tenant can stall den for the others: a FIFO where den reads a workspace's
/etc/passwd, long execs, and concurrent creates against a quota."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon
from tests.ssh.conftest import person
from tests.workspaces.conftest import Users, create, ok, sh


class Prober:
    """Times one call (``rpc.health`` by default) again and again in a thread."""

    def __init__(self, d: Daemon, method: str = "rpc.health", **params: Any) -> None:
        self.d, self.method, self.params = d, method, params
        self.seconds: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        c = self.d.client()
        try:
            while not self._stop.is_set():
                start = time.perf_counter()
                c.call(self.method, self.params)
                self.seconds.append(time.perf_counter() - start)
                self._stop.wait(0.02)
        finally:
            c.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[Prober]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(90)


def unblock_fifo(path: Path) -> None:
    """Give a reader stuck on the FIFO its writer (what old dens waited for)."""
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def test_fifo_passwd_does_not_stall_the_daemon(
    pool_daemon: Daemon, bb_image: str, users: Users, tmp_path: Path
) -> None:
    d = pool_daemon
    alice = person(d, users, tmp_path)
    ws = create(d, alice.name, "fifo")
    ok(d, ws["ref"], "rm /etc/passwd && mkfifo /etc/passwd")
    fifo = d.data_dir / "pool" / "volumes" / ws["id"] / "rootfs" / "etc" / "passwd"
    try:
        with Prober(d).running() as probe:
            res = alice.ssh(f"{alice.name}.fifo", "echo in", timeout=30)
            with pytest.raises(RpcError) as err:
                sh(d, ws["ref"], "id -u", user="dev")
            time.sleep(0.3)  # a few probes after both
    finally:
        unblock_fifo(fifo)
    assert res.returncode != 0
    assert "/etc/passwd is not a regular file" in res.stderr, res.stderr
    assert err.value.code == -32002
    assert "/etc/passwd is not a regular file" in err.value.message
    assert len(probe.seconds) >= 5
    assert max(probe.seconds) < 0.1, sorted(probe.seconds)[-5:]
    # root needs no passwd entry, and the workspace is still fine.
    assert ok(d, ws["ref"], "echo alive", user="root") == "alive\n"


@pytest.mark.slow
def test_long_execs_hold_no_database_session(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "long")
    started = time.monotonic()
    with ThreadPoolExecutor(30) as pool:
        execs = [pool.submit(sh, d, ws["ref"], "sleep 20; echo done") for _ in range(30)]
        # Wait until every exec runs in the workspace (not only was sent); init's
        # child is a sleep too.
        deadline = time.monotonic() + 15
        count = "cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep"
        while (n := int(ok(d, ws["ref"], count)) - 1) < 30:
            assert time.monotonic() < deadline, f"only {n} of the 30 execs started"
            time.sleep(0.2)
        with Prober(d, "user.list").running() as probe:
            time.sleep(5)
        results = [f.result(timeout=60) for f in execs]
    assert time.monotonic() - started < 45
    assert all(r["exit_code"] == 0 and r["stdout"] == "done\n" for r in results), results[:2]
    assert len(probe.seconds) >= 20
    assert statistics.median(probe.seconds) < 0.1, sorted(probe.seconds)
    assert max(probe.seconds) < 1.0, sorted(probe.seconds)[-5:]
    got = d.call("workspace.get", ref=ws["ref"])
    assert got["last_activity_kind"] == "exec"


def test_concurrent_creates_never_exceed_the_quota(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make(max_workspaces=3)

    def attempt(i: int) -> str:
        try:
            create(d, owner, f"q{i}")
            return "ok"
        except RpcError as exc:
            assert exc.code == -32004, exc  # quota exceeded, nothing else
            return "quota"

    with ThreadPoolExecutor(10) as pool:
        outcomes = list(pool.map(attempt, range(10)))
    assert outcomes.count("ok") == 3, outcomes
    rows = d.call("workspace.list", user=owner)
    assert len(rows) == 3
    for w in rows:
        assert ok(d, w["ref"], "echo alive") == "alive\n"
