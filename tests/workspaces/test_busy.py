"""Busy leases from inside (den-busy, POST /v1/busy) and `den why`, on a daemon
with a 4 s idle policy."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from den.meta import BUSY_NAME
from tests.conftest import Daemon
from tests.workspaces.conftest import ok, own_daemon, sh
from tests.workspaces.test_idle import IDLE_ENV, state, wait_for


@pytest.fixture(scope="module")
def busy_daemon() -> Iterator[Daemon]:
    with own_daemon({**IDLE_ENV, "DEN_BUSY_MAX_SECONDS": "300"}) as d:
        d.call("user.create", name="agent")
        d.call("workspace.create", name="w", user="agent")
        try:
            yield d
        finally:
            d.call("workspace.delete", ref="agent/w")


REF = "agent/w"


def test_a_lease_keeps_it_awake_past_idle_suspend_then_expires(busy_daemon: Daemon) -> None:
    d = busy_daemon
    got = json.loads(ok(d, REF, "den-busy 12s"))
    until = got["busy_until"]
    assert until is not None
    start = time.time()
    time.sleep(8)  # twice the idle policy
    assert state(d, REF) == "running"
    assert d.call("workspace.get", ref=REF)["busy_until"] == until
    why = d.call("workspace.why", ref=REF)
    assert why["busy_until"] == until and "busy lease" in why["summary"]
    assert why["idle_suspend"] == 4 and why["policy_from"] == "server"
    assert any(a["kind"] == "exec" for a in why["activity"])
    wait_for(lambda: state(d, REF) == "suspended", 25, "the suspend after the lease")
    assert time.time() - start >= 12 - 1
    assert d.call("workspace.get", ref=REF)["busy_until"] is None


def test_bounds_release_and_a_daemon_restart(busy_daemon: Daemon) -> None:
    d = busy_daemon
    too_long = sh(d, REF, "den-busy 2h")  # (resumes it: exec)
    assert too_long["exit_code"] != 0 and "400" in too_long["stderr"]
    assert json.loads(ok(d, REF, "den-busy 2m"))["busy_until"] is not None
    d.restart()
    # den listens in the running workspace again; the lease is a row: it held
    status = json.loads(ok(d, REF, "den-busy --status"))
    assert status["busy_until"] is not None
    assert json.loads(ok(d, REF, "den-busy --release"))["busy_until"] is None
    wait_for(lambda: state(d, REF) == "suspended", 25, "the suspend after the release")
    events = d.client().call("audit.list", {"method": "workspace.busy"})
    assert events and events[0]["via"] == "meta" and events[0]["actor"] == "agent"


def test_an_older_den_busy_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instance's read-only tmpfs keeps tini and den-busy; a den whose
    den-busy changed mounts a fresh one for the workspaces it starts next."""
    from den.backends import view
    from den.backends.bundle import TINI

    target = tmp_path / "init"
    try:
        view.ensure_init(target, TINI)
        assert (target / BUSY_NAME).read_text() == view.DEN_BUSY
        monkeypatch.setattr(view, "DEN_BUSY", view.DEN_BUSY + "# newer\n")
        view.ensure_init(target, TINI)
        assert (target / BUSY_NAME).read_text().endswith("# newer\n")
    finally:
        view.unmount(target)
