"""Sessions keep host processes while their command runs: bounded per den user,
and one whose client leaves as it starts still gets its SIGHUP."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from pathlib import Path

import asyncssh

from den.ssh.server import MAX_LISTENERS
from tests.conftest import ssh_key
from tests.ssh.conftest import Person, ssh_opts, ssh_port
from tests.workspaces.conftest import create, make_users, own_daemon


def test_sessions_per_user_are_bounded(tmp_path: Path) -> None:
    with own_daemon({"DEN_SSH_MAX_SESSIONS": "2"}) as d, make_users(d) as users:
        name = users.make()
        key, pub = ssh_key(tmp_path, name)
        d.call("key.add", user=name, key=pub)
        p = Person(d, name, key, ssh_port(d))
        ws = create(d, name, "w")["name"]
        long = [
            subprocess.Popen(
                ["ssh", *p.opts(), f"{ws}@127.0.0.1", "echo started; sleep 60"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            for proc in long:
                assert proc.stdout is not None and proc.stdout.readline() == "started\n"
            third = p.ssh(ws, "echo third")
            assert third.returncode == 1 and "third" not in third.stdout
            assert "ssh_max_sessions" in third.stderr, third.stderr
            # The den shell and other users are not counted against this user.
            assert p.ssh("den", "whoami").returncode == 0
        finally:
            for proc in long:
                proc.kill()
                proc.wait()
        # The client's end sends SIGHUP: the sleeps end, their places come back.
        deadline = time.monotonic() + 30
        while (res := p.ssh(ws, "echo again")).stdout != "again\n":
            assert time.monotonic() < deadline, res.stderr
            time.sleep(0.5)


def test_a_client_that_leaves_while_its_session_starts_leaves_nothing(
    alice: Person, ws: str
) -> None:
    rng = random.Random(7)
    for _ in range(30):
        proc = subprocess.Popen(
            ["ssh", *ssh_opts(alice.key, alice.port), f"{ws}@127.0.0.1", "sleep 313"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.15 + rng.random() * 0.3)  # after the session opened, maybe before it ran
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 20
    while True:
        ps = alice.d.call("workspace.exec", ref=f"{alice.name}/{ws}", argv=["ps"], user="root")
        left = [ln for ln in ps["stdout"].splitlines() if "sleep 313" in ln]
        if not left:
            break
        assert time.monotonic() < deadline, left
        time.sleep(0.5)


def test_remote_listeners_per_user_are_bounded(alice: Person, ws: str) -> None:
    """One connection asking for listener after listener gets MAX_LISTENERS, then
    refusals; cancelling one gives its place back (no fd flood of the daemon)."""

    async def flood() -> tuple[int, bool]:
        async with asyncssh.connect(
            "127.0.0.1",
            alice.port,
            username=ws,
            client_keys=[str(alice.key)],
            known_hosts=None,
            agent_path=None,
        ) as conn:
            held: list[asyncssh.SSHListener] = []
            refused = 0
            for _ in range(MAX_LISTENERS + 10):
                try:
                    held.append(await conn.forward_remote_port("localhost", 0, "127.0.0.1", 9))
                except asyncssh.ChannelListenError:
                    refused += 1
            held.pop().close()
            await asyncio.sleep(0.5)
            again = await conn.forward_remote_port("localhost", 0, "127.0.0.1", 9)
            return refused, again.get_port() > 0

    refused, again = asyncio.run(flood())
    assert refused == 10 and again
    # Gone with the connection: the user has every place back.
    assert alice.ssh(ws, "echo ok").stdout == "ok\n"
