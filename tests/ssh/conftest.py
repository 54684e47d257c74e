"""SSH fixtures: den users with keys, their workspaces, and the real OpenSSH client
pointed at the session's pool daemon's gateway.

Tests that run on both backends take a :class:`Box` (``box``: busybox, ``deb_box``:
Debian; ``sftp_box``: one with an sftp server). Its microvm case is a microVM the
session shares (a TCG boot costs seconds), owned by a user of the session's.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, ssh_key
from tests.storage.conftest import debian_image_as
from tests.workspaces.conftest import BACKENDS, Users, import_bb, make_users
from tests.workspaces.escape.conftest import dev_image_as

BB = "sshbb"
DEB = "sshdeb"
DEV = "sshdev"


def ssh_port(d: Daemon) -> int:
    return int(json.loads((d.data_dir / "serve.json").read_text())["ssh_port"])


def audit(d: Daemon, count: int = 1, **params: Any) -> list[dict[str, Any]]:
    """audit.list as root (its ``method`` parameter clashes with Daemon.call's).

    Waits a little for ``count`` events: the gateway writes logins and denials
    just after the connection ends.
    """
    c = d.client()
    deadline = time.monotonic() + 5
    try:
        while True:
            events: list[dict[str, Any]] = c.call("audit.list", params)
            if len(events) >= count or time.monotonic() > deadline:
                return events
            time.sleep(0.1)
    finally:
        c.close()


def ssh_opts(key: Path, port: int) -> list[str]:
    return [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "ConnectTimeout=20",
        "-i",
        str(key),
        "-p",
        str(port),
    ]


@dataclass
class Person:
    """A den user with an SSH key, and how to reach the gateway as them."""

    d: Daemon
    name: str
    key: Path
    port: int

    def opts(self) -> list[str]:
        return ssh_opts(self.key, self.port)

    def ssh(
        self,
        login: str,
        *cmd: str,
        input: str | bytes | None = None,
        timeout: float = 120,
        args: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess[Any]:
        """``ssh login@127.0.0.1 CMD`` (text unless ``input`` is bytes)."""
        text = not isinstance(input, bytes)
        return subprocess.run(
            ["ssh", *self.opts(), *args, f"{login}@127.0.0.1", *cmd],
            input=input,
            capture_output=True,
            text=text,
            timeout=timeout,
            check=False,
        )

    def scp(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        opts = [o if o != "-p" else "-P" for o in self.opts()]
        return subprocess.run(
            ["scp", "-q", *opts, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def sftp(
        self, login: str, batch: str, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        opts = [o if o != "-p" else "-P" for o in self.opts()]
        return subprocess.run(
            ["sftp", "-q", *opts, "-b", "-", f"{login}@127.0.0.1"],
            input=batch,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def person(d: Daemon, users: Users, tmp: Path, role: str = "member") -> Person:
    name = users.make(role=role)
    key, pub = ssh_key(tmp, name)
    d.call("key.add", user=name, key=pub)
    return Person(d, name, key, ssh_port(d))


@pytest.fixture(scope="session")
def bb_image(pool_daemon: Daemon) -> str:
    """The busybox image of the ssh tests (its own name: other test trees import theirs)."""
    return import_bb(pool_daemon, BB)


@pytest.fixture(scope="session")
def debian_image(pool_daemon: Daemon) -> str:
    """Debian bookworm minbase from the test cache (built when missing)."""
    return str(debian_image_as(pool_daemon, DEB)["name"])


@pytest.fixture(scope="session")
def dev_image(pool_daemon: Daemon) -> str:
    """den's dev image (ssh, git, python3 inside), from the escape suite's cache."""
    return dev_image_as(pool_daemon, DEV)


@pytest.fixture
def users(pool_daemon: Daemon) -> Iterator[Users]:
    u = Users(pool_daemon)
    try:
        yield u
    finally:
        u.cleanup()


@pytest.fixture
def alice(pool_daemon: Daemon, users: Users, tmp_path: Path) -> Person:
    return person(pool_daemon, users, tmp_path)


@pytest.fixture
def bob(pool_daemon: Daemon, users: Users, tmp_path: Path) -> Person:
    return person(pool_daemon, users, tmp_path)


@pytest.fixture
def admin(pool_daemon: Daemon, users: Users, tmp_path: Path) -> Person:
    return person(pool_daemon, users, tmp_path, role="admin")


def make_ws(p: Person, image: str = BB, **kw: Any) -> str:
    """A running workspace of ``p``'s; returns its name."""
    name = f"ws{secrets.token_hex(3)}"
    p.d.call("workspace.create", name=name, user=p.name, image=image, **kw)
    return name


@pytest.fixture
def ws(alice: Person, bb_image: str) -> Iterator[str]:
    yield make_ws(alice)


@dataclass
class Box:
    """A workspace to reach over ssh, and the person who owns it."""

    owner: Person
    name: str
    backend: str

    @property
    def ref(self) -> str:
        return f"{self.owner.name}/{self.name}"


@pytest.fixture(scope="session")
def vm_owner(pool_microvm: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Person]:
    """The owner of the session's shared microVMs (deleted with them at the end)."""
    with make_users(pool_microvm) as users:
        yield person(pool_microvm, users, tmp_path_factory.mktemp("vm-owner"))


def make_vm(owner: Person, image: str) -> str:
    return make_ws(owner, image=image, backend="microvm", cpu=1, mem="256M")


@pytest.fixture(scope="session")
def bb_vm(vm_owner: Person, bb_image: str) -> str:
    """A busybox microVM the ssh tests' microvm cases share (one boot)."""
    return make_vm(vm_owner, bb_image)


@pytest.fixture(scope="session")
def deb_vm(vm_owner: Person, debian_image: str) -> str:
    """A Debian microVM (OpenSSH's sftp-server inside) the microvm cases share."""
    return make_vm(vm_owner, debian_image)


def _box(request: pytest.FixtureRequest, image: str, vm: str) -> Box:
    if request.param == "microvm":
        owner: Person = request.getfixturevalue("vm_owner")
        return Box(owner, request.getfixturevalue(vm), "microvm")
    alice: Person = request.getfixturevalue("alice")
    return Box(alice, make_ws(alice, image=request.getfixturevalue(image)), "sandbox")


@pytest.fixture(params=BACKENDS)
def box(request: pytest.FixtureRequest) -> Box:
    """A busybox workspace: a new one of alice's, or the shared busybox microVM."""
    return _box(request, "bb_image", "bb_vm")


@pytest.fixture(params=BACKENDS)
def deb_box(request: pytest.FixtureRequest) -> Box:
    """A Debian workspace: a new one of alice's, or the shared Debian microVM."""
    return _box(request, "debian_image", "deb_vm")


@pytest.fixture(params=BACKENDS)
def sftp_box(request: pytest.FixtureRequest) -> Box:
    """Where scp and sftp go: a busybox sandbox (den's own sftp server serves it), or
    the Debian microVM (a microVM needs the image's sftp-server)."""
    return _box(request, "bb_image", "deb_vm")
