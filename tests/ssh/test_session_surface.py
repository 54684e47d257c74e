"""The smaller parts of a session's SSH surface: exit-signal (as Debian's sshd reports
it), env requests, X11 refused in words, keepalive replies."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest

from tests.ssh.conftest import Person

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
KILLERS = ("kill -TERM $$", "kill -SEGV $$", "kill -KILL $$", "exit 143")


@dataclass
class Sshd:
    port: int
    key: Path


@pytest.fixture
def sshd(alice: Person, tmp_path: Path) -> Iterator[Sshd]:
    """Debian's sshd on a free loopback port, taking alice's key for root."""
    d = tmp_path / "sshd"
    d.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host")], check=True
    )
    pub = Path(f"{alice.key}.pub").read_text()
    (d / "keys").write_text(pub)
    (d / "config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"PidFile {d / 'pid'}\nAuthorizedKeysFile {d / 'keys'}\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUseDNS no\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    with open(d / "log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "config")], stderr=log)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, (d / "log").read_text()
                time.sleep(0.05)
        yield Sshd(port, alice.key)
    finally:
        proc.terminate()
        proc.wait(10)


async def _outcomes(port: int, key: Path, user: str, commands: tuple[str, ...]) -> list[object]:
    async with asyncssh.connect(
        "127.0.0.1", port, username=user, client_keys=[str(key)], known_hosts=None
    ) as conn:
        out: list[object] = []
        for cmd in commands:
            r = await conn.run(cmd, check=False)
            out.append((r.exit_status, r.exit_signal))
        return out


def outcomes(port: int, key: Path, user: str) -> list[object]:
    return asyncio.run(_outcomes(port, key, user, KILLERS))


def test_exit_signal_as_sshd_reports_it(alice: Person, ws: str, sshd: Sshd) -> None:
    den = outcomes(alice.port, alice.key, ws)
    stock = outcomes(sshd.port, sshd.key, "root")
    assert den == stock
    assert den[0] == (-1, ("TERM", False, "", "")), den  # killed, not exit 143
    assert den[3] == (143, None)  # an exit with that code stays one
    # OpenSSH's client: exit 255 for a killed command, both ways.
    for port, login in ((alice.port, ws), (sshd.port, "root")):
        res = subprocess.run(
            ["ssh", *alice.opts()[:-2], "-p", str(port), f"{login}@127.0.0.1", "kill -TERM $$"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 255, (login, res.stderr)


def test_exit_signal_of_a_terminal_session(alice: Person, ws: str) -> None:
    async def run() -> object:
        async with asyncssh.connect(
            "127.0.0.1",
            alice.port,
            username=ws,
            client_keys=[str(alice.key)],
            known_hosts=None,
        ) as conn:
            # Many times: a shell that ends before its terminal was read once
            # came back as "could not start a terminal" (exit 1).
            seen = set()
            for _ in range(20):
                r = await conn.run("kill -HUP $$", term_type="xterm", check=False)
                seen.add((r.exit_status, r.exit_signal, r.stderr))
            return seen

    assert asyncio.run(run()) == {(-1, ("HUP", False, "", ""), "")}


def test_env_takes_the_locale_only(alice: Person, ws: str) -> None:
    sent = "LANG=C.UTF-8 LC_TIME=C FOO=bar LD_PRELOAD=/x.so BASH_ENV=/x PATH=/evil"
    res = alice.ssh(
        ws,
        'echo "$LANG|$LC_TIME|${FOO-unset}|${LD_PRELOAD-unset}|${BASH_ENV-unset}|$PATH"',
        args=("-o", f"SetEnv={sent}"),
    )
    lang, lc_time, foo, preload, bash_env, path = res.stdout.strip().split("|")
    assert (lang, lc_time, foo, preload, bash_env) == ("C.UTF-8", "C", "unset", "unset", "unset")
    assert path != "/evil"


def test_accept_env_globs() -> None:
    from den.ssh.surface import accept_env

    assert accept_env("LC_ALL", "C", [])
    assert not accept_env("LD_PRELOAD", "/x.so", [])
    assert accept_env("GIT_AUTHOR_NAME", "a", ["GIT_*"])
    assert not accept_env("GIT_X", "a\0b", ["GIT_*"])


def test_x11_refused_in_words(alice: Person, ws: str) -> None:
    res = subprocess.run(
        ["ssh", "-X", *alice.opts(), f"{ws}@127.0.0.1", "echo ran"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"DISPLAY": ":0", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0
    assert res.stdout == "ran\n"
    assert "den: X11 forwarding is not supported" in res.stderr


def test_keepalive_replies_keep_an_idle_client(alice: Person, ws: str) -> None:
    # ServerAliveCountMax=2 at 1 s: two unanswered probes end the client (exit 255).
    res = alice.ssh(
        ws,
        "sleep 6; echo alive",
        args=("-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2"),
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout == "alive\n"
