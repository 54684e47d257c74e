"""The owner's own account inside a workspace: made at create, where exec lands.

ssh, sftp and ``root+NAME`` logins are in tests/ssh/test_own_user.py.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon, ssh_key
from tests.workspaces.conftest import Users, create, invalid, ok, sh
from tests.workspaces.escape.conftest import dev_image  # noqa: F401  (a fixture)


def test_exec_lands_in_the_owners_account(
    pool_daemon: Daemon, debian_image: str, users: Users, tmp_path: Path
) -> None:
    d = pool_daemon
    _, pub = ssh_key(tmp_path, "ada")
    owner = users.make()
    d.call("user.update", name=owner, display_name="Ada Lovelace", email="ada@example.org")
    d.call("key.add", user=owner, key=pub)
    ws = create(d, owner, "mine", image=debian_image)
    ref = ws["ref"]
    out = ok(d, ref, 'id -un; id -u; id -g; echo "$HOME"; pwd')
    assert out == f"{owner}\n1000\n1000\n/home/{owner}\n/home/{owner}\n"
    entry = ok(d, ref, f"getent passwd {owner}").strip().split(":")
    assert entry[2:4] == ["1000", "1000"] and entry[5:] == [f"/home/{owner}", "/bin/bash"]
    # Root is still there when asked for: over RPC and with `den exec --user root`.
    assert ok(d, ref, "id -u", user="root") == "0\n"
    res = d.cli("exec", ref, "--user", "root", "--", "id", "-un", check=True)
    assert res.stdout == "root\n"
    assert d.cli("exec", ref, "--", "id", "-un", check=True).stdout == f"{owner}\n"
    # The owner's keys, for tools that check; private to the account.
    keys = ok(d, ref, "cat ~/.ssh/authorized_keys; stat -c '%U %a' ~/.ssh ~/.ssh/authorized_keys")
    assert pub in keys and f"{owner} 700\n{owner} 600\n" in keys
    # git commits as the den user (the debian test image has git).
    assert ok(d, ref, "git config --global user.name") == "Ada Lovelace\n"
    assert ok(d, ref, "git config --global user.email") == "ada@example.org\n"
    # sudo's drop-in is made even before sudo is installed (minbase has none).
    sudoers = ok(d, ref, f"stat -c '%U %a' /etc/sudoers.d/den-{owner}", user="root")
    assert sudoers == "root 440\n"
    assert ok(d, ref, f"cat /etc/sudoers.d/den-{owner}", user="root") == (
        f"{owner} ALL=(ALL:ALL) NOPASSWD: ALL\n"
    )
    # A normal account: root's files are not its own.
    assert sh(d, ref, "touch /root/x")["exit_code"] != 0


def test_sudo_needs_no_password(pool_daemon: Daemon, dev_image: str, users: Users) -> None:  # noqa: F811
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "dev", image=dev_image)
    assert ok(d, ws["ref"], "id -un; sudo -n true && sudo -n id -u") == f"{owner}\n0\n"
    assert ok(d, ws["ref"], "getent passwd $(id -un) | cut -d: -f7") == "/bin/bash\n"


def test_an_admin_lands_in_the_owners_account(
    pool_daemon: Daemon, debian_image: str, users: Users
) -> None:
    """The workspace is the owner's: an admin entering it is the owner inside, not
    themselves (their name has no account there)."""
    d = pool_daemon
    owner, admin = users.make(), users.make(role="admin")
    ws = create(d, owner, "theirs", image=debian_image)
    resp = d.call_as(admin, "workspace.exec", {"ref": ws["ref"], "argv": ["id", "-un"]})
    assert resp["result"]["stdout"] == f"{owner}\n"


def test_a_clone_for_another_user_gets_the_account_renamed(
    pool_daemon: Daemon, debian_image: str, users: Users
) -> None:
    """uid 1000 of the source (another user's account, or an image's own user)
    becomes the new owner's, home and files with it."""
    d = pool_daemon
    owner, admin = users.make(), users.make(role="admin")
    ws = create(d, owner, "src", image=debian_image)
    ok(d, ws["ref"], "echo kept > ~/notes")
    resp = d.call_as(admin, "workspace.clone", {"source": ws["ref"], "name": "copy"})
    copy = resp["result"]["ref"]
    assert copy == f"{admin}/copy"
    out = ok(d, copy, "id -un; id -u; cat ~/notes; stat -c %U ~/notes; pwd")
    assert out == f"{admin}\n1000\nkept\n{admin}\n/home/{admin}\n"
    assert sh(d, copy, f"id {owner}")["exit_code"] != 0  # no second account on uid 1000
    assert ok(d, copy, f"ls /etc/sudoers.d/den-{admin}", user="root")


def test_no_account_lands_as_root(pool_daemon: Daemon, bb_image: str, users: Users) -> None:
    """The busybox image has no useradd, no adduser and its own uid 1000 (dev): the
    workspace works, as root; a workspace whose account is gone (one made before
    den had accounts) lands as root too."""
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "bb", image=bb_image)
    assert ok(d, ws["ref"], "id -u; echo $HOME") == "0\n/root\n"
    assert ok(d, ws["ref"], "id -un", user="dev") == "dev\n"


def test_an_account_removed_inside_lands_as_root(
    pool_daemon: Daemon, debian_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "gone", image=debian_image)
    assert ok(d, ws["ref"], "id -u") == "1000\n"
    ok(d, ws["ref"], f"userdel {owner}", user="root")
    assert ok(d, ws["ref"], "id -un") == "root\n"


def test_email_is_checked_and_shown(pool_daemon: Daemon, users: Users) -> None:
    d = pool_daemon
    name = users.make()
    assert d.call("user.get", name=name)["email"] == ""
    for bad in ("not an email", "a@b", "a b@example.org", 'x"@example.org', "a@exa mple.org"):
        msg = invalid(d, "user.update", "email", name=name, email=bad)
        assert "NAME@DOMAIN" in msg
    invalid(d, "user.create", "email", name="wbademail", email="nope")
    with pytest.raises(RpcError):
        d.call("user.get", name="wbademail")
    invalid(d, "user.update", "email", name=name, email="a" * 250 + "@example.org")
    res = d.cli("user", "set", name, "--email", "grace@example.org", "--json", check=True)
    assert json.loads(res.stdout)["email"] == "grace@example.org"
    assert "grace@example.org" in d.cli("user", "show", name, check=True).stdout
    # The user sets their own; empty clears it.
    resp = d.call_as(name, "user.update", {"name": name, "email": ""})
    assert resp["result"]["email"] == ""


def test_root_is_no_user_name(pool_daemon: Daemon) -> None:
    """``ssh root+NAME@host`` is root inside NAME: no den user may be called root."""
    assert "reserved" in invalid(pool_daemon, "user.create", "name", name="root")


def test_the_account_written_before_start_follows_no_symlink(tmp_path: Path) -> None:
    """Written into the image's tree on the host: a symlink an imported image
    planted (etc/passwd -> a host file, home -> /) changes nothing outside it."""
    from den.services.account import write_account

    outside = tmp_path / "host-passwd"
    outside.write_text("root:x:0:0::/root:/bin/sh\n")
    tree = tmp_path / "img"
    (tree / "etc").mkdir(parents=True)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "sh").write_text("")
    (tree / "etc" / "group").write_text("root:x:0:\n")
    (tree / "etc" / "passwd").symlink_to(outside)
    assert not write_account(tree, "alice", "", ["ssh-ed25519 AAAA k"], "[user]\n")
    assert outside.read_text() == "root:x:0:0::/root:/bin/sh\n"
    (tree / "etc" / "passwd").unlink()
    (tree / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh")  # no final newline
    (tree / "home").symlink_to(tmp_path)
    with contextlib.suppress(OSError):  # refused at the symlink: where nothing went matters
        write_account(tree, "alice", "", ["ssh-ed25519 AAAA k"], "[user]\n")
    assert not (tmp_path / "alice").exists()
    (tree / "home").unlink()
    (tree / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh")
    assert write_account(tree, "alice", "A", ["ssh-ed25519 AAAA k"], "[user]\n\tname = A\n")
    assert (tree / "etc" / "passwd").read_text().splitlines()[-1] == (
        "alice:x:1000:1000:A:/home/alice:/bin/sh"
    )
    home = tree / "home" / "alice"
    assert home.stat().st_uid == 1000 and home.stat().st_mode & 0o777 == 0o700
    keys = home / ".ssh" / "authorized_keys"
    assert keys.read_text() == "ssh-ed25519 AAAA k\n" and keys.stat().st_uid == 1000
    assert (tree / "etc" / "sudoers.d" / "den-alice").stat().st_mode & 0o777 == 0o440
    # uid 1000 taken already: left to the script inside (a rename), nothing written.
    before = (tree / "etc" / "passwd").read_text()
    assert not write_account(tree, "bob", "", [], "")
    assert (tree / "etc" / "passwd").read_text() == before
