"""Too many failed logins from one address block it, even with a good key."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, make_base, ssh_key
from tests.ssh.conftest import Person, audit, ssh_port


@pytest.fixture
def strict_daemon() -> Iterator[Daemon]:
    base = make_base()
    d = Daemon(base)
    d.env.update({"DEN_SSH_MAX_FAILURES": "3", "DEN_SSH_FAILURE_WINDOW": "60"})
    try:
        d.start()
        yield d
    finally:
        d.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def test_failed_logins_block_the_address(strict_daemon: Daemon, tmp_path: Path) -> None:
    d = strict_daemon
    d.call("user.create", name="carol")
    good, pub = ssh_key(tmp_path, "good")
    d.call("key.add", user="carol", key=pub)
    bad, _ = ssh_key(tmp_path, "bad")
    port = ssh_port(d)
    carol = Person(d, "carol", good, port)
    stranger = Person(d, "stranger", bad, port)
    assert carol.ssh("den", "whoami").returncode == 0
    for _ in range(3):
        assert stranger.ssh("den", "whoami").returncode == 255
    blocked = carol.ssh("den", "whoami")
    assert blocked.returncode == 255 and "Permission denied" in blocked.stderr
    events = audit(d, count=4, method="ssh.denied", limit=10)
    assert [e["error"] for e in events][:1] == ["too many failed logins from this address"]
    assert len(events) == 4
