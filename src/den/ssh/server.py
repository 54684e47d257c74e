"""The gateway's listener: host keys, public-key authentication of den users,
a per-address limit on failed logins, the audit of every login and denial,
and the routing of each channel to the den shell or into a workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
from sqlalchemy import select

from den import tasks
from den.db.models import AuditEvent, SshKey, User
from den.ssh import hostkeys, quickack
from den.ssh.forward import open_tunnel
from den.ssh.link import Link
from den.ssh.session import WorkspaceSession
from den.ssh.shell import DenShell, command
from den.ssh.table import SshSession
from den.ssh.target import Denied, caller_of, resolve

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)
# asyncssh's defaults without chacha20-poly1305, which the OpenSSH client
# prefers: asyncssh computes it in two calls per packet, AES in one (AES-NI);
# sftp downloads ran at 59 MB/s with it and 92-99 MB/s with AES (CTR or GCM).
# Every client that has chacha20 has AES too.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)


class FailureLimit:
    """Counts failed logins per source address; too many within the window blocks it."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.failures: defaultdict[str, deque[float]] = defaultdict(deque)

    def _recent(self, addr: str) -> deque[float]:
        q = self.failures[addr]
        cutoff = time.monotonic() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        return q

    def blocked(self, addr: str) -> bool:
        blocked = len(self._recent(addr)) >= self.limit
        if not self.failures[addr]:
            del self.failures[addr]
        return blocked

    def failed(self, addr: str) -> None:
        self._recent(addr).append(time.monotonic())


class Gateway:
    def __init__(self, app: App) -> None:
        self.app = app
        s = app.settings
        self.limit = FailureLimit(s.ssh_max_failures, s.ssh_failure_window)
        self.server: asyncssh.SSHAcceptor | None = None
        self.connections: set[Connection] = set()

    async def start(self) -> int:
        """Listen; return the port (the configured one, or the free one picked for 0)."""
        s = self.app.settings
        logging.getLogger("asyncssh").setLevel(logging.WARNING)  # it logs every channel at info
        keys = await asyncio.to_thread(hostkeys.load_or_create, s.data_dir)
        await asyncio.to_thread(command)  # build the den shell's CLI before the first login
        quickack.install()
        self.server = await asyncssh.create_server(
            lambda: Connection(self),
            s.ssh_host,
            s.ssh_port,
            server_host_keys=keys,
            encryption_algs=list(CIPHERS),
            reuse_address=True,
            password_auth=False,
            kbdint_auth=False,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            line_editor=True,
            line_history=200,
            login_timeout=30,
            keepalive_interval=60,
            server_version="den",
        )
        port = int(self.server.sockets[0].getsockname()[1])
        self.app.ssh_port = port
        log.info("ssh gateway listening", extra={"ctx": {"host": s.ssh_host, "port": port}})
        return port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for c in list(self.connections):
            c.close()
        await asyncio.sleep(0)
        with contextlib.suppress(OSError):  # the console sockets' directory, when empty
            Path(f"/run/den/ssh{self.app.settings.instance}").rmdir()

    async def audit(
        self, method: str, actor: str, target: str, outcome: str, error: str, params: dict[str, Any]
    ) -> None:
        async with self.app.sessions() as db:
            db.add(
                AuditEvent(
                    actor=actor[:64],
                    via="ssh",
                    method=method,
                    target=target[:200],
                    params=params,
                    outcome=outcome,
                    error=error[:2000],
                    duration_ms=0.0,
                )
            )
            await db.commit()


class Connection(asyncssh.SSHServer):
    """One TCP connection: authenticates, then hands channels out."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.conn: asyncssh.SSHServerConnection | None = None
        self.client = ("?", 0)
        self.server = ("?", 0)
        self.login = ""
        self.began = False
        self.blocked = False
        self.tried: dict[str, tuple[User, str | None] | None] = {}
        self.reason = ""
        self.denied_user = ""
        self.user: User | None = None
        self.ref: str | None = None
        self.fingerprint = ""
        self.link: Link | None = None
        self.started = time.perf_counter()

    # -- connection ----------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        sock = conn.get_extra_info("sockname") or ("?", 0)
        self.client = (str(peer[0]), int(peer[1]))
        self.server = (str(sock[0]), int(sock[1]))
        self.gw.connections.add(self)
        if self.gw.limit.blocked(self.client[0]):
            self.blocked = True
            self.reason = "too many failed logins from this address"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.connections.discard(self)
        if self.link is not None:
            self.gw.app.ssh_sessions.remove(self.link.session)
            log.info(
                "ssh logout",
                extra={"ctx": {"user": self.link.caller.name, "session": self.link.session.id}},
            )
            return
        if not self.began:
            return
        if not self.blocked:
            self.gw.limit.failed(self.client[0])
        actor = self.denied_user or "anonymous"
        reason = self.reason or ("no key offered" if not self.tried else "unknown key")
        params = {
            "login": self.login[:64],
            "client": self._client(),
            "keys": sorted(self.tried)[:10],
        }
        log.info(
            "ssh denied",
            extra={"ctx": {"client": self._client(), "login": self.login[:64], "reason": reason}},
        )
        tasks.spawn(
            self.gw.audit("ssh.denied", actor, f"ssh:{self.login[:64]}", "denied", reason, params),
            name="ssh-audit",
        )

    def _client(self) -> str:
        return f"{self.client[0]}:{self.client[1]}"

    # -- authentication ----------------------------------------------------------------
    def begin_auth(self, username: str) -> bool:
        self.login = username
        self.began = True
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self.blocked:
            return False
        fp = key.get_fingerprint("sha256")
        if fp not in self.tried:
            self.tried[fp] = await self._lookup(fp, username)
        found = self.tried[fp]
        if found is None:
            return False
        self.user, self.ref = found
        self.fingerprint = fp
        return True

    async def _lookup(self, fp: str, login: str) -> tuple[User, str | None] | None:
        async with self.gw.app.sessions() as db:
            q = select(User).join(SshKey, SshKey.user_id == User.id).where(SshKey.fingerprint == fp)
            user = (await db.execute(q)).scalar_one_or_none()
            if user is None:
                return None
            try:
                ref = await resolve(db, user, login)
            except Denied as exc:
                self.reason = str(exc)
                self.denied_user = user.name
                return None
            db.expunge(user)
        return user, ref

    def auth_completed(self) -> None:
        assert self.user is not None and self.conn is not None
        caller = caller_of(self.user)
        conn = self.conn
        entry = SshSession(
            user=self.user.name,
            workspace=self.ref or "",
            client=self._client(),
            close=conn.close,
        )
        self.link = Link(self.gw.app, caller, self.ref, entry, self.client, self.server)
        self.gw.app.ssh_sessions.add(entry)
        target = f"workspace:{self.ref}" if self.ref else "shell"
        params = {
            "login": self.login[:64],
            "client": self._client(),
            "key": self.fingerprint,
            "session": entry.id,
        }
        log.info(
            "ssh login",
            extra={
                "ctx": {
                    "user": caller.name,
                    "target": target,
                    "client": self._client(),
                    "session": entry.id,
                }
            },
        )
        tasks.spawn(
            self.gw.audit("ssh.login", caller.name, target, "ok", "", params), name="ssh-audit"
        )

    # -- channels -----------------------------------------------------------------------
    def session_requested(self) -> Any:
        assert self.conn is not None and self.link is not None
        if self.link.ref is None:
            return self.conn.create_server_channel(encoding="utf-8"), DenShell(self.link)
        return self.conn.create_server_channel(encoding=None), WorkspaceSession(self.link)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        if self.link is None or self.link.ref is None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                "forward through a workspace login: ssh -L PORT:localhost:PORT WORKSPACE@host",
            )
        return open_tunnel(self.link, dest_host, dest_port)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False
