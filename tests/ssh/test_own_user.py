"""ssh, sftp, scp and the den shell land in the owner's own account inside;
``root+NAME`` (``root+OWNER.NAME``) logs in as root."""

from __future__ import annotations

from pathlib import Path

from tests.ssh.conftest import Person, make_ws


def test_ssh_lands_in_the_owners_account(alice: Person, debian_image: str) -> None:
    ws = make_ws(alice, image=debian_image)
    me = alice.name
    res = alice.ssh(ws, 'id -un; id -u; echo "$HOME $USER $SHELL"; pwd')
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"{me}\n1000\n/home/{me} {me} /bin/bash\n/home/{me}\n"
    res = alice.ssh(f"root+{ws}", 'id -u; echo "$HOME $USER"')
    assert res.stdout == "0\n/root root\n", res.stderr
    # The key this connection logged in with is in the account's authorized_keys.
    pub = alice.key.with_suffix(".pub").read_text().split()[1]
    assert pub in alice.ssh(ws, "cat ~/.ssh/authorized_keys").stdout
    # The den shell's exec lands there too, and --user root reaches root.
    res = alice.ssh("den", "exec", ws, "--", "id", "-un")
    assert res.stdout == f"{me}\n", res.stderr
    res = alice.ssh("den", "exec", ws, "--user", "root", "--", "id", "-un")
    assert res.stdout == "root\n", res.stderr


def test_sftp_and_scp_write_as_the_owner(alice: Person, debian_image: str, tmp_path: Path) -> None:
    ws = make_ws(alice, image=debian_image)
    me = alice.name
    f = tmp_path / "up.txt"
    f.write_text("up\n")
    assert alice.sftp(ws, f"put {f} s.txt\nmkdir d\n").returncode == 0  # relative: the home
    assert alice.scp(str(f), f"{ws}@127.0.0.1:~/c.txt").returncode == 0
    out = alice.ssh(ws, "stat -c '%n %U %u' s.txt d c.txt").stdout
    assert out == f"s.txt {me} 1000\nd {me} 1000\nc.txt {me} 1000\n"
    # Root's files stay root's: the account cannot write there, over sftp or scp.
    assert alice.sftp(ws, f"put {f} /root/x\n").returncode != 0
    assert alice.scp(str(f), f"{ws}@127.0.0.1:/etc/x").returncode != 0
    # ... and root+ is root for sftp and scp too.
    assert alice.scp(str(f), f"root+{ws}@127.0.0.1:/etc/x").returncode == 0
    assert alice.sftp(f"root+{ws}", f"put {f} /root/x\n").returncode == 0
    assert alice.ssh(ws, "stat -c %U /etc/x").stdout == "root\n"


def test_admins_enter_as_the_owner_or_as_root(
    alice: Person, bob: Person, admin: Person, debian_image: str
) -> None:
    """Another user's workspace is entered in its owner's account: the admin's own
    name has no account there."""
    ws = make_ws(alice, image=debian_image)
    assert admin.ssh(f"{alice.name}.{ws}", "id -un").stdout == f"{alice.name}\n"
    assert admin.ssh(f"root+{alice.name}.{ws}", "id -u").stdout == "0\n"
    assert admin.ssh(f"root+{alice.name}+{ws}", "id -u").stdout == "0\n"
    res = bob.ssh(f"root+{alice.name}.{ws}", "id -u")
    assert res.returncode == 1 and "may not enter" in res.stderr, res.stderr
    # root+ always names a workspace: one that is not there is refused, not the den shell.
    res = alice.ssh("root+nosuch", "id -u")
    assert res.returncode == 1 and "no workspace" in res.stderr, res.stderr
