"""Revocation is immediate: removing a key, deleting or demoting a user ends or
downgrades the SSH connections that relied on it within a second."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator

import pexpect

from tests.ssh.conftest import Person, make_ws


@contextlib.contextmanager
def held(p: Person, login: str, *cmd: str) -> Iterator[subprocess.Popen[str]]:
    """An ssh connection kept open (its standard input never ends)."""
    proc = subprocess.Popen(
        ["ssh", *p.opts(), f"{login}@127.0.0.1", *cmd],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def wait_line(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    while text not in (line := proc.stdout.readline()):
        assert line, f"ssh ended before printing {text!r}"


def ended_within(proc: subprocess.Popen[str], seconds: float) -> None:
    """Wait for ``proc`` to end, failing after ``seconds``."""
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the ssh connection was still open after {seconds} s") from None


def den_shell(p: Person) -> pexpect.spawn:
    child = pexpect.spawn("ssh", ["-tt", *p.opts(), "den@127.0.0.1"], encoding="utf-8", timeout=30)
    child.expect("den> ")
    return child


def fingerprint(p: Person) -> str:
    keys = p.d.call("key.list", user=p.name)
    return str(keys[0]["fingerprint"])


def test_key_removal_ends_den_shell_and_workspace_sessions(alice: Person, ws: str) -> None:
    d = alice.d
    with (
        held(alice, ws, "echo up; sleep 300") as inside,
        held(alice, "den", "key", "add", alice.name, "-") as prompt,
    ):
        wait_line(inside, "up")
        shell = den_shell(alice)
        try:
            time.sleep(0.5)  # the den shell command is waiting for its input
            d.call("key.remove", user=alice.name, fingerprint=fingerprint(alice))
            start = time.monotonic()
            ended_within(inside, 1.5)
            ended_within(prompt, 1.5)
            shell.expect(pexpect.EOF, timeout=1.5)
            assert time.monotonic() - start < 1.5
        finally:
            shell.close()
    # Nothing was minted on the way out, and the key no longer logs in.
    assert d.call("token.list", user=alice.name) == []
    assert alice.ssh("den", "token", "create").returncode == 255


def test_demotion_downgrades_den_shell_and_ends_other_tenants_sessions(
    alice: Person, admin: Person, ws: str
) -> None:
    d = alice.d
    mine = make_ws(admin)
    with (
        held(admin, f"{alice.name}.{ws}", "echo up; sleep 300") as theirs,
        held(admin, mine, "echo up; sleep 300") as own,
    ):
        wait_line(theirs, "up")
        wait_line(own, "up")
        shell = den_shell(admin)
        try:
            shell.sendline("key ls")
            shell.expect(alice.name)  # an admin sees every user's keys
            shell.expect("den> ")
            d.call("user.update", name=admin.name, role="member")
            ended_within(theirs, 1.5)
            time.sleep(0.5)
            assert own.poll() is None  # their own workspace stays theirs
            for cmd in ("key ls", "user ls"):
                shell.sendline(cmd)
                shell.expect("den> ")
                assert admin.name in shell.before and alice.name not in shell.before
            shell.sendline("whoami --json")
            shell.expect("member")
        finally:
            shell.close()


def test_user_delete_ends_their_sessions(bob: Person) -> None:
    d = bob.d
    with held(bob, "den", "key", "add", bob.name, "-") as prompt:
        shell = den_shell(bob)
        try:
            time.sleep(0.5)
            d.call("user.delete", name=bob.name)
            ended_within(prompt, 1.5)
            shell.expect(pexpect.EOF, timeout=1.5)
        finally:
            shell.close()


def test_held_den_shell_prompts_do_not_stall_other_users(alice: Person, bob: Person) -> None:
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(30):
            procs.append(
                subprocess.Popen(
                    ["ssh", *alice.opts(), "den@127.0.0.1", "key", "add", alice.name, "-"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        # Those beyond alice's share are refused at once, with a reason.
        deadline = time.monotonic() + 30
        while sum(p.poll() is not None for p in procs) < 22 and time.monotonic() < deadline:
            time.sleep(0.2)
        t = time.monotonic()
        res = bob.ssh("den", "ls", "--json", timeout=30)
        took = time.monotonic() - t
        assert res.returncode == 0 and json.loads(res.stdout) == [], res.stderr
        assert took < 5, f"bob's den shell took {took:.1f} s"
        refused = [p for p in procs if p.poll() is not None]
        assert len(refused) == 22
        errors = [p.communicate()[1] for p in refused]
        assert all("den shell commands already" in e for e in errors), errors[:3]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
