"""Test fixtures: a real den daemon on a temporary socket, data dir and port.

Every daemon gets its own account prefix and socket group, so the host
accounts it creates are recognisable and removed afterwards even when a test
fails.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from den.cli.client import Client, RpcError

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEN = str(VENV_BIN / "den")
CALL_AS = str(Path(__file__).parent / "helpers" / "call_as.py")


class Daemon:
    """A `den serve` process under test, with helpers to call it."""

    def __init__(self, base: Path, database_url: str = "") -> None:
        tag = secrets.token_hex(2)
        self.instance, self._instance_lock = allocate_instance()
        self.base = base
        self.prefix = f"dt{tag}-"
        self.group = f"dt{tag}"
        self.socket = base / "den.sock"
        self.data_dir = base / "data"
        self.log_file = base / "den.log"
        self.database_url = database_url
        self.proc: subprocess.Popen[bytes] | None = None
        # Runs `den serve` under a command (e.g. nsenter --net=...: a test's netns).
        self.wrap: list[str] = []
        self.http_url = ""
        self.env = {
            **os.environ,
            "DEN_CONFIG": str(base / "den.toml"),
            "DEN_SOCKET": str(self.socket),
            "DEN_DATA_DIR": str(self.data_dir),
            "DEN_HTTP_PORT": "0",
            "DEN_SSH_PORT": "0",
            "DEN_ACCOUNT_PREFIX": self.prefix,
            "DEN_SOCKET_GROUP": self.group,
            "DEN_LOG_FILE": str(self.log_file),
            "DEN_LOG_LEVEL": "debug",
            "DEN_INSTANCE": str(self.instance),
            "DEN_FSTAB": str(base / "fstab"),
            # Test pools are 4-8G: the 10G default would pass a member's disk quota
            # (a share of the pool) with the first workspace.
            "DEN_DEFAULT_DISK": "512M",
            # Image builds of every test session share one package cache: a fresh
            # clone downloads each .deb once.
            "DEN_APT_CACHE": str(ROOT / ".cache" / "apt"),
            # Caddy only where a test uses workspace URLs (tests/web turn it on).
            "DEN_WEB": "false",
            # The microvm backend only where a test runs microVMs (it turns it on
            # and seeds the session's guest assets: tests/microvm/conftest.py).
            "DEN_MICROVM": "false",
        }
        if database_url:
            self.env["DEN_DATABASE_URL"] = database_url
        for var in ("DEN_URL", "DEN_TOKEN"):
            self.env.pop(var, None)

    # -- process -------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        state = self.data_dir / "serve.json"
        state.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [*self.wrap, DEN, "serve"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.base / "stderr.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"den serve exited with {self.proc.returncode}:\n"
                    + (self.base / "stderr.log").read_text()[-3000:]
                )
            if state.exists() and self.socket.exists():
                try:
                    info = json.loads(state.read_text())
                except json.JSONDecodeError:
                    info = None
                if info:
                    self.http_url = info["http"]
                    return
            time.sleep(0.05)
        raise RuntimeError("den serve did not start in time")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return rc

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the daemon and remove what it made; every step runs even if one fails."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            try:
                purge_instance(self.instance, self.data_dir)
            finally:
                try:
                    remove_accounts(self.prefix, self.group)
                finally:
                    from den.host.instances import release

                    release(self.instance, self._instance_lock, "test")

    # -- calling ---------------------------------------------------------------
    def client(self, token: str | None = None, tcp: bool = False) -> Client:
        if tcp or token is not None:
            return Client(url=self.http_url, token=token, timeout=60)
        return Client(socket_path=str(self.socket), timeout=60)

    def call(self, method: str, **params: Any) -> Any:
        """Call as root over the unix socket."""
        c = self.client()
        try:
            return c.call(method, params)
        finally:
            c.close()

    def error(self, method: str, **params: Any) -> RpcError:
        """Call as root and return the error it must raise."""
        with pytest.raises(RpcError) as info:
            self.call(method, **params)
        return info.value

    def cli(
        self,
        *args: str,
        user: str | None = None,
        input: str | None = None,
        check: bool = False,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the `den` CLI, as root or as a den user's host account."""
        kw: dict[str, Any] = {"env": self.env}
        if user is not None:
            kw.update(self._as(user))
        res = subprocess.run(
            [DEN, *args], input=input, capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and res.returncode != 0:
            raise AssertionError(f"den {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def call_as(self, user: str, method: str, params: Any = None) -> dict[str, Any]:
        """Call over the unix socket from the host account of den user ``user``.

        Returns the whole JSON-RPC response object.
        """
        res = subprocess.run(
            [sys.executable, CALL_AS, str(self.socket), method, json.dumps(params)],
            capture_output=True,
            text=True,
            timeout=60,
            **self._as(user),
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def call_as_uid(self, uid: int, gid: int, method: str, params: Any = None) -> dict[str, Any]:
        res = subprocess.run(
            [sys.executable, CALL_AS, str(self.socket), method, json.dumps(params)],
            capture_output=True,
            text=True,
            timeout=60,
            user=uid,
            group=gid,
            extra_groups=[grp.getgrnam(self.group).gr_gid],
        )
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def _as(self, user: str) -> dict[str, Any]:
        pw = pwd.getpwnam(self.prefix + user)
        return {
            "user": pw.pw_uid,
            "group": pw.pw_gid,
            "extra_groups": [grp.getgrnam(self.group).gr_gid],
            "env": {**self.env, "HOME": str(self.base)},
        }

    def log_text(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


def allocate_instance() -> tuple[int, int]:
    """An instance number no other test daemon on this host holds."""
    from den.host.instances import claim

    return claim(60, 98, "test")


def purge_instance(instance: int, data_dir: Path) -> None:
    """Remove every workspace the instance left on the host, with den's own code."""
    from den.host.purge import purge_sync

    purge_sync(instance, data_dir)


def remove_accounts(prefix: str, group: str) -> None:
    for pw in pwd.getpwall():
        if pw.pw_name.startswith(prefix):
            subprocess.run(["userdel", pw.pw_name], capture_output=True, check=False)
    try:
        grp.getgrnam(group)
    except KeyError:
        return
    subprocess.run(["groupdel", group], capture_output=True, check=False)


def make_base() -> Path:
    # World-traversable, so that den users' host accounts reach the socket.
    base = Path(tempfile.mkdtemp(prefix="den-test-"))
    base.chmod(0o755)
    return base


@contextlib.contextmanager
def running_daemon(env: dict[str, str] | None = None, pool: str | None = None) -> Iterator[Daemon]:
    """A started daemon of its own (with a loopback pool of size ``pool``), disposed of after."""
    d = Daemon(make_base())
    d.env.update(env or {})
    try:
        if pool is not None:
            init_pool(d, size=pool)
        d.start()
        yield d
    finally:
        dispose(d, pool=pool is not None)


@pytest.fixture
def fresh_daemon() -> Iterator[Daemon]:
    """A daemon of the test's own, for tests that restart or kill it."""
    with running_daemon() as d:
        yield d


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """One daemon shared by the session: tests use names of their own."""
    with running_daemon() as d:
        yield d


def dispose(d: Daemon, pool: bool = False) -> None:
    """Stop the daemon, purge its instance, unmount its pool, remove its files: all of it,
    even when one step fails."""
    try:
        d.cleanup()
    finally:
        try:
            if pool:
                teardown_pool(d)
        finally:
            shutil.rmtree(d.base, ignore_errors=True)


def init_pool(d: Daemon, size: str = "8G") -> None:
    """Run `den init --yes` for the daemon's data dir: a loopback btrfs pool."""
    d.env["DEN_FSTAB"] = str(d.base / "fstab")
    d.env["DEN_POOL_SIZE"] = size
    res = subprocess.run(
        [DEN, "init", "--yes", "--no-image"],
        # The guest assets of a microVM daemon are seeded, not built by every init.
        env={**d.env, "DEN_MICROVM": "false"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if res.returncode != 0:
        raise RuntimeError(f"den init failed:\n{res.stdout}\n{res.stderr}")


def teardown_pool(d: Daemon) -> None:
    """Unmount everything under the daemon's pool, then the pool; detach its loop device."""
    pool = d.data_dir / "pool"
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp == str(pool) or mp.startswith(str(pool) + "/"):
                mounts.append(mp)
    for mp in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mp], capture_output=True, check=False)
    img = d.data_dir / "pool.img"
    res = subprocess.run(["losetup", "-j", str(img)], capture_output=True, text=True, check=False)
    for line in res.stdout.splitlines():
        subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True, check=False)


@pytest.fixture(scope="session")
def pool_daemon() -> Iterator[Daemon]:
    """A daemon on a btrfs loopback pool made by `den init`, shared by the session.

    It serves workspace URLs too (Caddy on a free port; tests/web use them)."""
    env = {
        "DEN_WEB": "true",
        "DEN_HTTPS_PORT": str(unused_port()),
        # test_forward_limits waits this out twice: shorter than the default 30 s.
        "DEN_SSH_FORWARD_OPEN_SECONDS": "12",
        # tests/workspaces/test_llm.py waits out a stalled client (120 s by default).
        "DEN_LLM_TIMEOUT": "5",
        # Mail on (tests/workspaces/test_mail.py): its limits small enough to test,
        # its relay a server that test runs on this port.
        "DEN_MAIL_DOMAIN": "mail.den.test",
        "DEN_MAIL_PORT": str(unused_port()),
        "DEN_MAIL_MAX_BYTES": str(64 * 1024),
        "DEN_MAIL_MAX_RECIPIENTS": "3",
        "DEN_MAIL_RELAY": f"127.0.0.1:{unused_port()}",
        "DEN_MAIL_PER_HOUR": "2",
        # microVMs too (tests parametrised over backends): its guest assets are seeded
        # only when a microvm case first asks (pool_microvm).
        "DEN_MICROVM": "true",
    }
    with running_daemon(env, pool="8G") as d:
        yield d


@pytest.fixture(scope="session")
def pool_microvm(pool_daemon: Daemon) -> Daemon:
    """The session's pool daemon, able to boot microVMs: den's guest kernel and
    initramfs (built once per cache, tests/microvm/conftest.py) and the acceleration
    verdict (probed once per cache) put into its data directory.

    Only microvm cases ask for it, so ``-m "not slow"`` never fetches a kernel. The
    daemon reads the assets at each create: no restart, and a restart keeps them."""
    import asyncio

    from den.backends.microvm import assets as mv
    from tests.microvm.conftest import ASSET_CACHE, seed_assets

    asyncio.run(mv.ensure_assets(ASSET_CACHE))
    asyncio.run(mv.probe_accel(ASSET_CACHE))
    seed_assets(pool_daemon.data_dir)
    shutil.copy2(
        mv.asset_dir(ASSET_CACHE) / "accel.json", mv.asset_dir(pool_daemon.data_dir) / "accel.json"
    )
    return pool_daemon


def unused_port() -> int:
    """A TCP port nothing uses now, below the kernel's ephemeral range.

    Not the kernel's pick (bind to port 0): that is an ephemeral port, which any
    outgoing connection on the host may take the moment its listener goes away,
    and a server restarted on it (Caddy after a kill) could then not bind it.
    """
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port between 10000 and {low}")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_daemon(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    """A fresh daemon on SQLite, then on the PostgreSQL server of `make test`."""
    url = ""
    if request.param == "postgresql":
        url = os.environ.get("DEN_TEST_PG_URL", "")
        if not url:
            pytest.skip(
                "DEN_TEST_PG_URL is not set: run through `make test` (scripts/with-postgres)"
            )
        reset_postgres(url)
    base = make_base()
    d = Daemon(base, url)
    try:
        d.start()
        yield d
    finally:
        dispose(d)


def reset_postgres(url: str) -> None:
    """Drop every table so each PostgreSQL daemon starts from an empty schema."""
    import asyncio

    from sqlalchemy import text

    from den.db.engine import make_engine

    async def reset() -> None:
        engine = make_engine(url)
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
        await engine.dispose()

    asyncio.run(reset())


_counter = iter(range(1, 1_000_000))


@pytest.fixture
def name() -> str:
    """A user name no other test in the session uses."""
    return f"u{next(_counter)}-{secrets.token_hex(2)}"


def ssh_key(base: Path, label: str = "k") -> tuple[Path, str]:
    """Make an ed25519 key pair; return (private key path, public key text)."""
    path = base / f"{label}-{secrets.token_hex(3)}"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", label, "-f", str(path)], check=True
    )
    return path, path.with_suffix(".pub").read_text().strip()


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, str]:
    return ssh_key(tmp_path)
