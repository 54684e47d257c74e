"""Caddy as den's child: started with den, restarted if it dies, stopped with den.

Caddy runs as an account of its own, ``PREFIX-web`` (``den--web``: no den
user's account can be named so, since names start with a letter), with no
other groups and only the right to bind a low port. It is not the Debian
package's ``caddy`` account: whoever runs as that one (the package's own
service, its admin API on localhost) must not inherit den's firewall
exception to workspaces or its gate. Caddy keeps its state under den's data
directory and its admin endpoint on a unix socket there. It dies with den (parent-death signal);
a Caddy left by a killed daemon is ended at the next start by its pid file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from den import proc, tasks
from den.config import Settings
from den.web import caddy_config

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
START_TIMEOUT = 20.0


class CaddyPaths:
    """Where one daemon's Caddy keeps its things."""

    def __init__(self, data_dir: Path, socket_path: Path) -> None:
        self.dir = data_dir / "caddy"
        self.config = self.dir / "config.json"
        self.pidfile = data_dir / "caddy.pid"
        self.admin = self.dir / "admin.sock"
        self.storage = self.dir / "data"
        # den's gate and pages, for Caddy alone (group caddy, 0660).
        self.gate = socket_path.with_name(socket_path.stem + "-web.sock")

    @property
    def root_cert(self) -> Path:
        """The root certificate of Caddy's internal CA (made at Caddy's first start)."""
        return self.storage / "pki" / "authorities" / "local" / "root.crt"


def account_name(settings: Settings) -> str:
    return settings.account_prefix + "-web"


def _account(name: str) -> tuple[int, int] | None:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return None
    return pw.pw_uid, pw.pw_gid


async def ensure_account(settings: Settings) -> int:
    """Make Caddy's account if missing; its uid (the firewall lets it reach workspaces)."""
    name = account_name(settings)
    if _account(name) is None:
        await proc.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "den web front door (Caddy)",
                name,
            ]
        )
    ids = _account(name)
    if ids is None:
        raise RuntimeError(f"the account {name} for Caddy could not be made")
    return ids[0]


def end_leftover(paths: CaddyPaths) -> None:
    """End the Caddy a killed daemon left running (the pid is checked to be that Caddy)."""
    try:
        pid = int(paths.pidfile.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        cmdline = []
    if str(paths.config).encode() in cmdline:
        log.warning("ending the Caddy a previous daemon left", extra={"ctx": {"pid": pid}})
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    paths.pidfile.unlink(missing_ok=True)


class Caddy:
    def __init__(self, app: App) -> None:
        s = app.settings
        self.app = app
        self.account = account_name(s)
        self.paths = CaddyPaths(s.data_dir, s.socket)
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0
        # Only Caddy knows this path: the ask endpoint is on a listener workspaces reach.
        self.ask_secret = secrets.token_urlsafe(24)

    def config(self, http_port: int) -> dict[str, Any]:
        ask = f"http://127.0.0.1:{http_port}/_den/ask/{self.ask_secret}"
        p = self.paths
        return caddy_config.build(self.app.settings, p.gate, p.admin, p.storage, ask)

    def prepare(self, http_port: int) -> None:
        """Write Caddy's directory and config, owned by its account."""
        p = self.paths
        end_leftover(p)
        ids = _account(self.account)
        p.dir.mkdir(mode=0o700, exist_ok=True)
        p.storage.mkdir(mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            p.admin.unlink()
        fd = os.open(p.config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.config(http_port), f)
        if ids is not None:
            for path in (p.dir, p.storage, p.config):
                os.chown(path, *ids, follow_symlinks=False)
            for root, dirs, files in os.walk(p.storage):
                for n in dirs + files:
                    os.chown(os.path.join(root, n), *ids, follow_symlinks=False)

    def _argv(self) -> list[str]:
        caddy = [str(self.app.settings.caddy_bin), "run", "--config", str(self.paths.config)]
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise RuntimeError("setpriv (util-linux) is missing: den runs Caddy through it")
        return [
            setpriv,
            "--pdeathsig",
            "TERM",
            "--reuid",
            self.account,
            "--regid",
            self.account,
            "--clear-groups",
            "--inh-caps",
            "+net_bind_service",
            "--ambient-caps",
            "+net_bind_service",
            *caddy,
        ]

    async def start(self, http_port: int) -> None:
        """Start Caddy and wait until it serves; raise if it does not."""
        self.prepare(http_port)
        await self._spawn()
        self._supervisor = tasks.spawn(self._supervise(http_port), "caddy-supervisor")

    async def _spawn(self) -> None:
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.paths.dir),
            "XDG_DATA_HOME": str(self.paths.dir),
            "XDG_CONFIG_HOME": str(self.paths.dir),
        }
        self.proc = await asyncio.create_subprocess_exec(
            *self._argv(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.paths.dir,
            env=env,
        )
        self.paths.pidfile.write_text(f"{self.proc.pid}\n")
        tasks.spawn(self._relay_log(self.proc), f"caddy-log-{self.proc.pid}")
        try:
            await asyncio.wait_for(self._ready(self.proc), START_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"Caddy did not start serving on port {self.app.settings.web_port} within "
                f"{START_TIMEOUT:.0f} s; see den's log for what it said"
            ) from None
        log.info(
            "caddy serving",
            extra={"ctx": {"pid": self.proc.pid, "port": self.app.settings.web_port}},
        )

    async def _ready(self, proc: asyncio.subprocess.Process) -> None:
        s = self.app.settings
        host = s.web_host or "127.0.0.1"
        while True:
            if proc.returncode is not None:
                raise RuntimeError(
                    f"Caddy exited at start (status {proc.returncode}); is port {s.web_port} "
                    "free? see den's log for what it said"
                )
            if self.paths.admin.exists() and await self._handshake(host):
                return
            await asyncio.sleep(0.05)

    async def _handshake(self, host: str) -> bool:
        """Whether Caddy listens and, with its own CA, already has the wildcard
        certificate (it is issued just after start: a request before would fail)."""
        s = self.app.settings
        tls: ssl.SSLContext | None = None
        if s.tls == "internal":
            tls = ssl.create_default_context()
            tls.check_hostname = False
            tls.verify_mode = ssl.CERT_NONE  # a probe of readiness, not of trust
        try:
            _r, w = await asyncio.open_connection(
                host, s.web_port, ssl=tls, server_hostname=f"ready.{s.domain}" if tls else None
            )
        except (OSError, ssl.SSLError):
            return False
        w.close()
        return True

    async def _relay_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            # The ask endpoint's path is Caddy's secret: never in den's log.
            line = raw.decode(errors="replace").strip().replace(self.ask_secret, "***")
            try:
                entry = json.loads(line)
                level = str(entry.get("level", "info"))
                msg = str(entry.get("msg", line))
            except ValueError:
                level, msg = "info", line
            log.log(
                logging.WARNING if level in ("warn", "error", "fatal", "panic") else logging.DEBUG,
                "caddy: %s",
                msg,
                extra={"ctx": {"caddy": line[:2000]}},
            )

    async def _supervise(self, http_port: int) -> None:
        delay = 0.5
        while not self._stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            self.app.metrics.caddy_restarts.inc()
            log.error(
                "caddy exited; restarting", extra={"ctx": {"status": code, "in": f"{delay}s"}}
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                self.prepare(http_port)
                await self._spawn()
                delay = 0.5
            except (OSError, RuntimeError) as err:
                log.error("caddy restart failed: %s", err)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.paths.pidfile.unlink(missing_ok=True)

    async def admin_get(self, path: str) -> Any:
        """GET from Caddy's admin API (its unix socket)."""
        conn = aiohttp.UnixConnector(path=str(self.paths.admin))
        async with (
            aiohttp.ClientSession(connector=conn) as http,
            # Caddy's admin API refuses any Host on a unix socket but an empty one.
            http.get(f"http://localhost{path}", headers={"Host": ""}) as resp,
        ):
            return await resp.json()


def bind_gate(path: Path, account: str) -> socket.socket:
    """The unix socket Caddy reaches den on (its account's group, 0660; nobody else)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    ids = _account(account)
    if ids is None:
        raise RuntimeError(f"no account {account} for Caddy")
    os.chown(path, 0, ids[1])
    os.chmod(path, 0o660)
    sock.listen(1024)
    sock.setblocking(False)
    return sock
