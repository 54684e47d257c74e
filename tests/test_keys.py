"""key.add/list/remove with real ssh-keygen keys."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon

KEY_TYPES = [
    ("ed25519", [], "ssh-ed25519"),
    ("rsa", ["-b", "2048"], "ssh-rsa"),
    ("ecdsa", ["-b", "256"], "ecdsa-sha2-nistp256"),
]


def keygen(base: Path, kind: str, extra: list[str], comment: str = "me@host") -> Path:
    path = base / f"{kind}-{secrets.token_hex(3)}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", comment, "-f", str(path)],
        check=True,
    )
    return path


def fingerprint(pub: Path) -> str:
    out = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()[1]


@pytest.fixture
def user(daemon: Daemon, name: str) -> Iterator[str]:
    daemon.call("user.create", name=name)
    try:
        yield name
    finally:
        daemon.client().call("user.delete", {"name": name})


@pytest.mark.parametrize(("kind", "extra", "algorithm"), KEY_TYPES, ids=[k[0] for k in KEY_TYPES])
def test_add_list_remove(
    daemon: Daemon, user: str, tmp_path: Path, kind: str, extra: list[str], algorithm: str
) -> None:
    priv = keygen(tmp_path, kind, extra, comment=f"{kind} key of {user}")
    pub = priv.with_suffix(".pub")
    fp = fingerprint(pub)
    assert fp.startswith("SHA256:")
    added = daemon.call("key.add", user=user, key=pub.read_text())
    assert added["user"] == user
    assert added["fingerprint"] == fp
    assert added["algorithm"] == algorithm
    assert added["comment"] == f"{kind} key of {user}"
    listed = daemon.call("key.list", user=user)
    assert [k["fingerprint"] for k in listed] == [fp]
    assert daemon.call("user.get", name=user)["keys"] == 1
    # The member sees their own key without naming themselves.
    resp = daemon.call_as(user, "key.list")
    assert [k["fingerprint"] for k in resp["result"]] == [fp]
    removed = daemon.call("key.remove", user=user, fingerprint=fp)
    assert removed["fingerprint"] == fp
    assert daemon.call("key.list", user=user) == []
    err = daemon.error("key.remove", user=user, fingerprint=fp)
    assert err.code == -32001


def test_several_keys_and_admin_listing(daemon: Daemon, user: str, tmp_path: Path) -> None:
    fps = []
    for kind, extra, _ in KEY_TYPES:
        pub = keygen(tmp_path, kind, extra).with_suffix(".pub")
        fps.append(daemon.call("key.add", user=user, key=pub.read_text())["fingerprint"])
    assert {k["fingerprint"] for k in daemon.call("key.list", user=user)} == set(fps)
    everyone = daemon.call("key.list")
    assert set(fps) <= {k["fingerprint"] for k in everyone}
    assert daemon.call("user.get", name=user)["keys"] == 3


def test_same_key_twice(daemon: Daemon, user: str, name: str, keypair: tuple[Path, str]) -> None:
    _, pub = keypair
    daemon.call("key.add", user=user, key=pub)
    err = daemon.error("key.add", user=user, key=pub)
    assert err.code == -32002
    assert "already" in err.message
    other = name + "o"
    daemon.call("user.create", name=other)
    try:
        err = daemon.error("key.add", user=other, key=pub)
        assert err.code == -32002
        assert "already registered" in err.message
        # The same key with a different comment is still the same key.
        body = " ".join(pub.split()[:2]) + " other-comment"
        assert daemon.error("key.add", user=other, key=body).code == -32002
        assert daemon.call("key.list", user=other) == []
    finally:
        daemon.call("user.delete", name=other)
    assert len(daemon.call("key.list", user=user)) == 1


def test_private_key_refused(daemon: Daemon, user: str, keypair: tuple[Path, str]) -> None:
    priv, _ = keypair
    text = priv.read_text()
    err = daemon.error("key.add", user=user, key=text)
    assert err.code == -32602
    assert "private key" in str(err)
    assert daemon.call("key.list", user=user) == []
    # An RSA key in PEM form too.
    pem = keygen(priv.parent, "rsa", ["-b", "2048", "-m", "PEM"])
    err = daemon.error("key.add", user=user, key=pem.read_text())
    assert err.code == -32602 and "private key" in str(err)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "   ",
        "hello",
        "ssh-ed25519",
        "ssh-ed25519 AAAAnotreallybase64!!! x",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJunk",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP== x",
        "\x00\x01\x02",
        "x" * 20000,
    ],
    ids=[
        "empty",
        "blank",
        "word",
        "type-only",
        "bad-base64",
        "truncated",
        "dss-junk",
        "binary",
        "huge",
    ],
)
def test_garbage_refused(daemon: Daemon, user: str, garbage: str) -> None:
    err = daemon.error("key.add", user=user, key=garbage)
    assert err.code == -32602
    assert daemon.call("key.list", user=user) == []


def test_two_keys_in_one_call_refused(daemon: Daemon, user: str, tmp_path: Path) -> None:
    a = keygen(tmp_path, "ed25519", []).with_suffix(".pub").read_text()
    b = keygen(tmp_path, "ed25519", []).with_suffix(".pub").read_text()
    err = daemon.error("key.add", user=user, key=a + b)
    assert err.code == -32602
    assert "one public key" in str(err)
    assert daemon.call("key.list", user=user) == []
    # Comment lines and blank lines around one key are fine.
    out = daemon.call("key.add", user=user, key=f"# my laptop\n\n{a}\n")
    assert out["algorithm"] == "ssh-ed25519"


def test_authorized_keys_options_refused(
    daemon: Daemon, user: str, keypair: tuple[Path, str]
) -> None:
    _, pub = keypair
    err = daemon.error("key.add", user=user, key=f'command="/bin/sh" {pub}')
    assert err.code == -32602
    assert daemon.call("key.list", user=user) == []


def test_unknown_user_and_fingerprint(
    daemon: Daemon, user: str, name: str, keypair: tuple[Path, str]
) -> None:
    _, pub = keypair
    missing = name + "missing"
    assert daemon.error("key.add", user=missing, key=pub).code == -32001
    assert daemon.error("key.list", user=missing).code == -32001
    err = daemon.error("key.remove", user=user, fingerprint="SHA256:nope")
    assert err.code == -32001


def test_member_manages_own_keys(daemon: Daemon, user: str, keypair: tuple[Path, str]) -> None:
    priv, pub = keypair
    resp = daemon.call_as(user, "key.add", {"user": user, "key": pub})
    fp = resp["result"]["fingerprint"]
    assert fp == fingerprint(priv.with_suffix(".pub"))
    resp = daemon.call_as(user, "key.remove", {"user": user, "fingerprint": fp})
    assert resp["result"]["fingerprint"] == fp
    assert daemon.call("key.list", user=user) == []


def test_cli_key_add_ls_rm(daemon: Daemon, user: str, keypair: tuple[Path, str]) -> None:
    priv, _ = keypair
    pub = priv.with_suffix(".pub")
    fp = fingerprint(pub)
    daemon.cli("key", "add", user, str(pub), check=True)
    res = daemon.cli("key", "ls", user, "--json", check=True)
    assert fp in res.stdout
    daemon.cli("key", "rm", user, fp, check=True)
    assert daemon.call("key.list", user=user) == []
    res = daemon.cli("key", "add", user, str(priv))
    assert res.returncode != 0 and "private key" in res.stderr + res.stdout


def test_concurrent_add_of_one_key(daemon: Daemon, name: str, keypair: tuple[Path, str]) -> None:
    """The same key raced onto several users: one gets it, the others a conflict."""
    from concurrent.futures import ThreadPoolExecutor

    from den.cli.client import RpcError

    _, pub = keypair
    users = [f"{name}k{i}" for i in range(4)]
    for u in users:
        daemon.call("user.create", name=u)

    def add(u: str) -> object:
        c = daemon.client()
        try:
            return c.call("key.add", {"user": u, "key": pub})
        except RpcError as exc:
            return exc
        finally:
            c.close()

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(add, users))
        assert sum(isinstance(r, dict) for r in results) == 1, results
        codes = [r.code for r in results if isinstance(r, RpcError)]
        assert codes == [-32002] * 3, [
            (r.code, r.message) for r in results if isinstance(r, RpcError)
        ]
        assert len(daemon.call("key.list")) >= 1
        owners = [k["user"] for k in daemon.call("key.list") if k["user"] in users]
        assert len(owners) == 1
    finally:
        for u in users:
            daemon.client().call("user.delete", {"name": u})
