"""The gateway against unauthenticated clients: lockouts per (address, key),
a limit of refused keys per connection, modern algorithms only, and a denial
audit that an unauthenticated client cannot grow without bound."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from den.ssh.guard import FailureLimit
from tests.conftest import Daemon, make_base, ssh_key
from tests.ssh.conftest import Person, audit, ssh_opts, ssh_port


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


def carol(d: Daemon, tmp_path: Path) -> Person:
    d.call("user.create", name="carol")
    good, pub = ssh_key(tmp_path, "good")
    d.call("key.add", user="carol", key=pub)
    return Person(d, "carol", good, ssh_port(d))


def test_a_locked_out_key_does_not_lock_out_the_address(
    strict_daemon: Daemon, tmp_path: Path
) -> None:
    d = strict_daemon
    good = carol(d, tmp_path)
    bad, _ = ssh_key(tmp_path, "bad")
    stranger = Person(d, "stranger", bad, good.port)
    for _ in range(4):
        assert stranger.ssh("den", "whoami").returncode == 255
    # Everyone here is 127.0.0.1: the stranger's failures block the stranger's key only.
    ok = good.ssh("den", "whoami")
    assert ok.returncode == 0, ok.stderr
    events = audit(d, count=2, method="ssh.denied", limit=10)
    reasons = {e["error"]: e["params"]["count"] for e in events}
    assert reasons == {
        "unknown key": 3,
        "too many failed logins with this key from this address": 1,
    }


def test_a_connection_is_cut_after_six_refused_keys(strict_daemon: Daemon, tmp_path: Path) -> None:
    d = strict_daemon
    good = carol(d, tmp_path)
    strangers = [ssh_key(tmp_path, f"s{i}")[0] for i in range(6)]
    opts = good.opts()
    del opts[opts.index("-i") : opts.index("-i") + 2]

    def ids(keys: list[Path]) -> list[str]:
        return [a for k in [*keys, good.key] for a in ("-i", str(k))]

    # Six wrong keys first: the good seventh is never tried.
    res = subprocess.run(
        ["ssh", *opts, *ids(strangers), "den@127.0.0.1", "whoami"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 255 and "too many authentication failures" in res.stderr, res.stderr
    res = subprocess.run(
        ["ssh", *opts, *ids(strangers[:5]), "den@127.0.0.1", "whoami"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0 and "carol" in res.stdout, res.stderr


def test_only_modern_algorithms(strict_daemon: Daemon, tmp_path: Path) -> None:
    d = strict_daemon
    d.call("user.create", name="rsa")
    key = tmp_path / "rsa"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "3072", "-N", "", "-f", str(key)], check=True
    )
    d.call("key.add", user="rsa", key=key.with_suffix(".pub").read_text())
    port = ssh_port(d)

    def ssh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", *ssh_opts(key, port), *args, "den@127.0.0.1", "whoami"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert ssh().returncode == 0
    assert ssh("-o", "PubkeyAcceptedAlgorithms=rsa-sha2-256").returncode == 0
    # SHA-1 signatures, by the client's key or the host key: refused.
    assert ssh("-o", "PubkeyAcceptedAlgorithms=ssh-rsa").returncode == 255
    assert ssh("-o", "HostKeyAlgorithms=ssh-rsa").returncode == 255
    assert ssh("-o", "HostKeyAlgorithms=rsa-sha2-512").returncode == 0
    assert ssh("-o", "KexAlgorithms=diffie-hellman-group14-sha1").returncode == 255
    assert ssh("-o", "KexAlgorithms=curve25519-sha256").returncode == 0
    assert ssh("-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha1").returncode == 255
    assert ssh("-o", "Ciphers=aes128-ctr", "-o", "MACs=hmac-sha2-256").returncode == 0
    dsa = asyncssh.generate_private_key("ssh-dss").export_public_key().decode()
    with pytest.raises(Exception, match="DSA"):
        d.call("key.add", user="rsa", key=dsa)


async def _refused(port: int, n: int) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    sem = asyncio.Semaphore(20)

    async def one(i: int) -> None:
        async with sem:
            with pytest.raises(asyncssh.PermissionDenied):
                await asyncssh.connect(
                    "127.0.0.1",
                    port,
                    username=f"u{i}-{secrets.token_hex(2)}",
                    client_keys=[key],
                    known_hosts=None,
                    agent_path=None,
                )

    await asyncio.gather(*(one(i) for i in range(n)))


def test_refused_connections_add_a_bounded_number_of_audit_rows(strict_daemon: Daemon) -> None:
    d = strict_daemon
    asyncio.run(_refused(ssh_port(d), 200))
    # Every login name differs: one row per name up to the cap, the rest in one row.
    deadline = time.monotonic() + 10
    while True:
        events = audit(d, method="ssh.denied", limit=1000)
        total = sum(e["params"]["count"] for e in events)
        if total >= 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert total == 200
    assert len(events) <= 101
    overflow = [e for e in events if e["target"] == "ssh:*"]
    assert len(overflow) == 1 and overflow[0]["params"]["count"] == 200 - (len(events) - 1)


def test_the_failure_table_is_bounded() -> None:
    limit = FailureLimit(limit=3, window=60, max_entries=100)
    for i in range(1000):
        limit.failed("127.0.0.1", f"SHA256:{i}")
    assert len(limit.failures) == 100
    for _ in range(3):
        limit.failed("127.0.0.1", "SHA256:bad")
    assert limit.blocked("127.0.0.1", "SHA256:bad")
    assert not limit.blocked("127.0.0.1", "SHA256:good")
    assert not limit.blocked("10.0.0.1", "SHA256:bad")
