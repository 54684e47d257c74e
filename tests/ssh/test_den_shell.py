"""The den shell over ssh: the registry's CLI, run as the SSH user."""

from __future__ import annotations

import json

import pexpect

from tests.ssh.conftest import Person


def test_noninteractive_json_and_exit_codes(alice: Person, ws: str) -> None:
    res = alice.ssh("den", "ls", "--json")
    assert res.returncode == 0, res.stderr
    refs = [w["ref"] for w in json.loads(res.stdout)]
    assert refs == [f"{alice.name}/{ws}"]
    who = json.loads(alice.ssh("den", "whoami", "--json").stdout)
    assert (who["name"], who["via"], who["right"]) == (alice.name, "ssh", "write")
    missing = alice.ssh("den", "show", "nosuch")
    assert missing.returncode == 3 and "no workspace" in missing.stderr
    assert alice.ssh("den", "frobnicate").returncode == 2
    assert alice.ssh("den", "user", "add", "someone").returncode == 4  # admins only
    piped = alice.ssh("den", input="whoami --json\nshow nosuch\nls --json\n", args=("-T",))
    assert piped.returncode == 0 and piped.stdout.count(alice.name) >= 2
    assert "den>" not in piped.stdout and "no workspace" in piped.stderr
    help_text = alice.ssh("den", "help")
    assert (
        help_text.returncode == 0 and "ls" in help_text.stdout and "ssh-config" in help_text.stdout
    )


def test_key_add_from_stdin_only(alice: Person, tmp_path: object) -> None:
    from tests.conftest import ssh_key

    _path, pub = ssh_key(alice.key.parent, "second")
    res = alice.ssh("den", "ssh-key", "add", alice.name, "-", input=pub + "\n")
    assert res.returncode == 0, res.stderr
    listed = json.loads(alice.ssh("den", "ssh-key", "list", "--json").stdout)
    assert len(listed) == 2
    # Piped into the shell: the command reads the rest of the input, then the shell ends.
    _path3, pub3 = ssh_key(alice.key.parent, "third")
    res = alice.ssh("den", input=f"key add {alice.name} -\n{pub3}\n", args=("-T",))
    assert res.returncode == 0, res.stderr
    assert len(json.loads(alice.ssh("den", "key", "ls", "--json").stdout)) == 3
    # A path would name a file of the server: refused.
    res = alice.ssh("den", "key", "add", alice.name, "/etc/ssh/ssh_host_rsa_key.pub")
    assert res.returncode == 2 and "standard input" in res.stderr


def test_interactive_prompt_history_and_ctrl_c(alice: Person, ws: str) -> None:
    child = pexpect.spawn(
        "ssh",
        ["-tt", *alice.opts(), "den@127.0.0.1"],
        encoding="utf-8",
        timeout=30,
        dimensions=(40, 120),
    )
    try:
        child.expect("den> ")
        child.sendline("whoami")
        child.expect(alice.name)
        child.expect("den> ")
        child.sendline("ls")
        child.expect(ws)
        child.expect("den> ")
        child.send("\x1b[A\x1b[A")  # history: back to whoami
        child.send("\r")
        child.expect("member")
        child.expect("den> ")
        child.send("half a line\x03")  # Ctrl-C drops the line
        child.expect("den> ")
        child.sendline(f"rm {ws}")  # a confirmation is asked on the terminal
        child.expect(r"\[y/N\]")
        child.sendline("n")
        child.expect("Abort")
        child.expect("den> ")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
