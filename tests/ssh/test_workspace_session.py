"""ssh WS@host: a PTY shell, commands, exit codes, env, denial, resume on connect.

What a client sees runs on both backends (a :class:`Box`); the denials are the
gateway's own and run on the sandbox only.
"""

from __future__ import annotations

import json
import time

import pexpect

from tests.conftest import Daemon
from tests.ssh.conftest import Box, Person, audit


def test_exec_streams_and_exit_code(box: Box) -> None:
    alice, ws = box.owner, box.name
    res = alice.ssh(ws, "echo out; echo err >&2; id -u; pwd; exit 7")
    assert res.returncode == 7
    assert res.stdout == "out\n0\n/root\n"
    assert res.stderr == "err\n"
    assert alice.ssh(ws, "true").returncode == 0
    assert alice.ssh(ws, "nosuchcommand").returncode == 127


def test_script_through_stdin_like_vscode(box: Box) -> None:
    alice, ws = box.owner, box.name
    script = "set -e\nA=$(echo 21)\necho $((A * 2))\ncat /etc/hostname\n"
    res = alice.ssh(ws, "sh -s", input=script)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["42", ws]
    data = bytes(range(256)) * 4096  # binary, 1 MiB, through stdin and back
    back = alice.ssh(ws, "cat", input=data)
    assert back.returncode == 0 and back.stdout == data


def test_client_env_and_term(box: Box) -> None:
    alice, ws = box.owner, box.name
    res = alice.ssh(ws, "echo $FOO $LANG $HOME $USER", args=("-o", "SetEnv=FOO=bar LANG=C"))
    assert res.stdout.split() == ["C", "/root", "root"]  # FOO: not in ssh_accept_env


def test_pty_shell_resize_ctrl_c_exit_status(box: Box) -> None:
    alice, ws = box.owner, box.name
    child = pexpect.spawn(
        "ssh",
        ["-tt", *alice.opts(), f"{ws}@127.0.0.1"],
        encoding="utf-8",
        timeout=30,
        dimensions=(30, 100),
        env={"TERM": "xterm-256color", "PATH": "/usr/bin:/bin"},
    )
    try:
        child.sendline("PS1='P''S> '; echo T=$TERM; tty")
        child.expect("T=xterm-256color")
        child.expect("/dev/pts/")
        child.sendline("stty size")
        child.expect("30 100")
        child.setwinsize(45, 132)
        time.sleep(0.3)
        child.sendline("stty size")
        child.expect("45 132")
        child.sendline("sleep 100")
        time.sleep(0.5)
        child.sendcontrol("c")
        child.expect("PS> ")
        child.sendline("echo rc=$?")
        child.expect("rc=130")
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5


def test_other_users_workspace_is_denied(
    alice: Person, bob: Person, admin: Person, ws: str
) -> None:
    # Told only once bob proved his key (the key query is the same for any login name).
    res = bob.ssh(f"{alice.name}.{ws}", "true")
    assert res.returncode == 1 and "may not enter" in res.stderr, res.stderr
    # A bare name that is none of bob's workspaces is the den shell, not alice's workspace.
    assert json.loads(bob.ssh(ws, "whoami", "--json").stdout)["name"] == bob.name
    as_admin = admin.ssh(f"{alice.name}.{ws}", "cat /etc/hostname")
    assert as_admin.returncode == 0 and as_admin.stdout.strip() == ws
    assert admin.ssh(f"{alice.name}+{ws}", "true").returncode == 0
    events = audit(bob.d, method="ssh.denied", actor=bob.name)
    assert events and "may not enter" in events[0]["error"]


def test_unknown_key_is_denied_and_audited(
    pool_daemon: Daemon, alice: Person, ws: str, tmp_path: object
) -> None:
    from pathlib import Path

    from tests.conftest import ssh_key
    from tests.ssh.conftest import Person as P

    key, _pub = ssh_key(Path(str(tmp_path)), "stranger")
    stranger = P(pool_daemon, "stranger", key, alice.port)
    res = stranger.ssh(ws, "true")
    assert res.returncode == 255 and "Permission denied" in res.stderr
    # Password and keyboard-interactive are not even offered.
    res = stranger.ssh(
        ws, "true", args=("-o", "PreferredAuthentications=password,keyboard-interactive")
    )
    assert res.returncode == 255
    # Denials are written aggregated, up to a second late.
    deadline = time.monotonic() + 10
    while not any(
        e["target"] == f"ssh:{ws}" and e["error"] == "unknown key"
        for e in audit(pool_daemon, method="ssh.denied", limit=20)
    ):
        assert time.monotonic() < deadline, "the denial was not audited"
        time.sleep(0.2)
    ok = alice.ssh(ws, "true")
    assert ok.returncode == 0
    logins = audit(pool_daemon, method="ssh.login", actor=alice.name)
    assert logins[0]["target"] == f"workspace:{alice.name}/{ws}" and logins[0]["via"] == "ssh"


def test_suspended_workspace_resumes_and_stopped_starts(box: Box) -> None:
    alice, ws = box.owner, box.name
    d = alice.d
    ref = box.ref
    res = alice.ssh(ws, "echo $$ > /tmp/pid-before")
    assert res.returncode == 0
    d.call("workspace.suspend", ref=ref)
    assert d.call("workspace.get", ref=ref)["state"] == "suspended"
    t = time.perf_counter()
    res = alice.ssh(ws, "echo awake")
    took = time.perf_counter() - t
    assert res.returncode == 0 and res.stdout == "awake\n", res.stderr
    assert d.call("workspace.get", ref=ref)["state"] == "running"
    print(f"ssh round trip into a suspended workspace: {took * 1e3:.0f} ms")
    d.call("workspace.stop", ref=ref)
    res = alice.ssh(ws, "cat /tmp/pid-before >/dev/null && echo started")
    assert res.returncode == 0 and res.stdout == "started\n", res.stderr
    assert d.call("workspace.get", ref=ref)["state"] == "running"


def test_debian_login_shell(deb_box: Box) -> None:
    """In the owner's own account (tests/ssh/test_own_user.py)."""
    alice, name = deb_box.owner, deb_box.name
    res = alice.ssh(name, "echo $0 $SHELL; cd; pwd")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["/bin/bash", "/bin/bash", f"/home/{alice.name}"]
    child = pexpect.spawn(
        "ssh", ["-tt", *alice.opts(), f"{name}@127.0.0.1"], encoding="utf-8", timeout=30
    )
    try:
        child.sendline("shopt -q login_shell && echo LOGIN-$PWD-$LANG")
        child.expect(f"LOGIN-/home/{alice.name}-C.UTF-8")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()


def test_keystrokes_right_after_a_freeze_wake_an_open_shell(box: Box) -> None:
    """A shell is open; the workspace is suspended right after a keystroke was checked;
    the next keystrokes (within that same second) must still wake it: the cgroup is
    read at most once a second, and a keystroke in between is checked at its end."""
    alice, ws = box.owner, box.name
    d = alice.d
    ref = box.ref
    child = pexpect.spawn(
        "ssh",
        ["-tt", *alice.opts(), f"{ws}@127.0.0.1"],
        encoding="utf-8",
        timeout=20,
        env={"TERM": "xterm", "PATH": "/usr/bin:/bin"},
    )
    try:
        child.sendline("echo rea''dy")
        child.expect("ready")
        child.send(" ")  # checked now: not frozen
        d.call("workspace.suspend", ref=ref)
        child.sendline("\x15echo wo''ke")  # ^U clears the space; within the second
        child.expect("woke")
        assert d.call("workspace.get", ref=ref)["state"] == "running"
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
