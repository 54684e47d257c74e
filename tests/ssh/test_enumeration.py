"""A public key alone tells nothing: the gateway's answer to "would you take
this key for LOGIN?" is the same for every login name, and key.add of another
user's key does not say whose it is."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from den.cli.client import RpcError
from tests.ssh.conftest import Person, ssh_opts


def key_query(key_pub: Path, port: int, login: str) -> bool:
    """Whether the server answers the key query (no signature) with "accepts key".

    ``key_pub`` is a public key without its private part: ssh can only ask.
    """
    res = subprocess.run(
        ["ssh", "-v", *ssh_opts(key_pub, port), f"{login}@127.0.0.1", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 255, res.stderr
    return "Server accepts key" in res.stderr


def public_only(p: Person, tmp_path: Path) -> Path:
    pub = tmp_path / "only.pub"
    shutil.copy(p.key.with_suffix(".pub"), pub)
    return pub


def test_key_query_is_the_same_for_every_login(
    alice: Person, bob: Person, ws: str, tmp_path: Path
) -> None:
    pub = public_only(alice, tmp_path)
    logins = [
        f"{alice.name}.{ws}",  # exists
        f"{alice.name}.nosuch",  # does not
        ws,
        "nosuch",
        f"{bob.name}.anything",  # someone else's
        "den",
    ]
    assert {login: key_query(pub, alice.port, login) for login in logins} == dict.fromkeys(
        logins, True
    )
    # A key of no den user is refused for every name alike.
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    other.unlink()
    stranger = other.with_suffix(".pub")
    assert not any(key_query(stranger, alice.port, login) for login in logins)
    # With the private key, the missing name is told after login, plainly.
    res = alice.ssh(f"{alice.name}.nosuch", "true")
    assert res.returncode == 1 and f"no workspace {alice.name}/nosuch" in res.stderr, res.stderr


def test_key_add_of_another_users_key_does_not_say_whose(alice: Person, bob: Person) -> None:
    pub = alice.key.with_suffix(".pub").read_text()
    with pytest.raises(RpcError) as err:
        alice.d.call("key.add", user=bob.name, key=pub)
    assert alice.name not in err.value.message
    assert "already registered" in err.value.message
    res = bob.ssh("den", "key", "add", bob.name, "-", input=pub)
    assert res.returncode != 0 and "already registered" in res.stderr
    assert alice.name not in res.stderr
