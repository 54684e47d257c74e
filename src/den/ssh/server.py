"""The gateway's listener: host keys, public-key authentication of den users,
limits on failed logins, the audit of every login and denial, the routing of
each channel to the den shell or into a workspace, and the end of connections
whose key or user is revoked.

Which workspace a login names is only looked at once the client has proved
its key: the answer to "would you take this key?" is the same for every login
name, so a public key alone tells nobody which workspaces exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
from asyncssh.kex import get_kex_algs
from sqlalchemy import select

from den import tasks
from den.db.models import AuditEvent, SshKey, User
from den.slots import UserSlots
from den.ssh import agent, hostkeys, limits, quickack, remote, surface
from den.ssh.forward import open_tunnel
from den.ssh.guard import DenialLog, FailureLimit
from den.ssh.link import Link
from den.ssh.session import WorkspaceSession
from den.ssh.shell import DenShell, command
from den.ssh.streamlocal import listen_remote, open_direct
from den.ssh.table import SshSession
from den.ssh.target import Denied, caller_of, resolve

if TYPE_CHECKING:
    from den.app import App
    from den.services.revocation import Revoked

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
# Modern algorithms only: no SHA-1 (ssh-rsa signatures, hmac-sha1, the sha1
# key exchanges), no DSA, no 1024/2048-bit groups.
KEX = (
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)
MACS = (
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "umac-128@openssh.com",
)
SIGNATURES = (
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "rsa-sha2-512",
    "rsa-sha2-256",
)
_SIGNATURES = frozenset(a.encode() for a in SIGNATURES)
# Client key types taken (an RSA key then signs with rsa-sha2-*): no DSA.
KEY_TYPES = frozenset({*SIGNATURES, "ssh-rsa"}) - {"rsa-sha2-512", "rsa-sha2-256"}
MAX_AUTH_TRIES = 6  # failed key offers per connection, as OpenSSH's MaxAuthTries
DENIED_LINGER = 10.0  # seconds a connection denied after login stays to say why
# `ssh -R` listeners (ports and paths) one den user may hold at once, over all
# connections: each costs the daemon a few fds (IPv4 and IPv6 sockets, a pidfd);
# an IDE forwards a handful. Past it a request is refused (and logged).
MAX_LISTENERS = 64
_listeners = UserSlots()


def _modern(keys: list[asyncssh.SSHKey]) -> list[asyncssh.SSHKeyPair]:
    """The host keys, offered with modern signature algorithms only (the RSA
    key as rsa-sha2-256/512, never as SHA-1 ssh-rsa)."""
    pairs = list(asyncssh.load_keypairs(keys))
    for kp in pairs:
        kp.host_key_algorithms = [a for a in kp.host_key_algorithms if a in _SIGNATURES]
        kp.sig_algorithms = [a for a in kp.sig_algorithms if a in _SIGNATURES]
    return pairs


class Gateway:
    def __init__(self, app: App) -> None:
        self.app = app
        s = app.settings
        self.limit = FailureLimit(s.ssh_max_failures, s.ssh_failure_window)
        self.denials = DenialLog(app.sessions)
        self.server: asyncssh.SSHAcceptor | None = None
        self.connections: set[Connection] = set()
        self.agents = agent.Agents(app)
        self._unsubscribe = app.revocations.subscribe(self.revoked)

    def revoked(self, ev: Revoked) -> None:
        """A key, user or role changed: connections that relied on it end or downgrade."""
        for c in list(self.connections):
            c.revoked(ev)

    async def start(self) -> int:
        """Listen; return the port (the configured one, or the free one picked for 0)."""
        s = self.app.settings
        logging.getLogger("asyncssh").setLevel(logging.WARNING)  # it logs every channel at info
        keys = _modern(await asyncio.to_thread(hostkeys.load_or_create, s.data_dir))
        kex = [a for a in KEX if a.encode() in get_kex_algs()]
        await asyncio.to_thread(command)  # build the den shell's CLI before the first login
        quickack.install()
        self.server = await asyncssh.create_server(
            lambda: Connection(self),
            s.ssh_host,
            s.ssh_port,
            server_host_keys=keys,
            encryption_algs=list(CIPHERS),
            kex_algs=kex,
            mac_algs=list(MACS),
            signature_algs=list(SIGNATURES),
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
        self._unsubscribe()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for c in list(self.connections):
            c.close()
        self.agents.close()
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
        # Per (key fingerprint, login): its den user and what the login means for
        # them (the workspace, None for the den shell, or a Denied), or None: no one's.
        self.tried: dict[tuple[str, str], tuple[User, str | Denied | None] | None] = {}
        self.failures = 0
        self.reason = ""
        self.user: User | None = None
        self.ref: str | Denied | None = None
        self.fingerprint = ""
        self.link: Link | None = None
        self.denied = ""  # the key is good but the login names nothing of the user's
        self.ended = False
        self.started = time.perf_counter()

    # -- connection ----------------------------------------------------------------
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        sock = conn.get_extra_info("sockname") or ("?", 0)
        self.client = (str(peer[0]), int(peer[1]))
        self.server = (str(sock[0]), int(sock[1]))
        self.gw.connections.add(self)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def end(self, why: str) -> None:
        """Close the connection, telling the client why (ssh prints it)."""
        if self.link is not None:
            self.link.revoked = True
        if self.conn is not None and not self.ended:
            self.ended = True
            log.info("ssh connection ended", extra={"ctx": {"client": self._client(), "why": why}})
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, f"den: {why}")

    def revoked(self, ev: Revoked) -> None:
        if self.user is None or self.user.id != ev.user_id:
            return
        if ev.kind == "user":
            self.end(f"the user {ev.user} was deleted")
        elif ev.kind == "key" and ev.fingerprint == self.fingerprint:
            self.end("the key of this connection was removed")
        elif ev.kind == "role":
            self.user.role = ev.role
            if self.link is None:
                return
            self.link.caller = caller_of(self.user)
            owner = (self.link.ref or "").partition("/")[0]
            if owner and owner != self.user.name and ev.role != "admin":
                self.end(f"{self.user.name} may no longer enter {self.link.ref}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw.connections.discard(self)
        if self.link is not None and self.link.agent is not None:
            self.link.agent.close()
        if self.link is not None:
            limits.connection_ended(self.link.session.id)
            self.gw.app.ssh_sessions.remove(self.link.session)
            log.info(
                "ssh logout",
                extra={"ctx": {"user": self.link.caller.name, "session": self.link.session.id}},
            )
            return
        if self.denied or not self.began:
            return
        reason = self.reason or ("no key offered" if not self.tried else "unknown key")
        self._deny("anonymous", reason)

    def _deny(self, actor: str, reason: str) -> None:
        log.info(
            "ssh denied",
            extra={"ctx": {"client": self._client(), "login": self.login[:64], "reason": reason}},
        )
        keys = sorted({fp for fp, _login in self.tried})
        self.gw.denials.add(self.client[0], self.login, actor, reason, keys)

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
        # The answer depends on the key alone, never on the login name.
        fp = key.get_fingerprint("sha256")
        addr = self.client[0]
        if key.get_algorithm() not in KEY_TYPES:
            self.reason = f"{key.get_algorithm()} keys are not accepted"
            return self._failed(fp, count=False)
        if self.gw.limit.blocked(addr, fp):
            self.reason = "too many failed logins with this key from this address"
            return self._failed(fp, count=False)
        if (fp, username) not in self.tried:
            self.tried[fp, username] = await self._lookup(fp, username)
        found = self.tried[fp, username]
        if found is None:
            return self._failed(fp, count=True)
        self.user, self.ref = found
        self.fingerprint = fp
        # RSA keys sign with SHA-2 only: refuse the SHA-1 "ssh-rsa" signature
        # asyncssh would otherwise verify (it checks against this set).
        key.all_sig_algorithms = {a for a in key.all_sig_algorithms if a in _SIGNATURES}
        return True

    def _failed(self, fp: str, count: bool) -> bool:
        """A refused key: counted against (address, key), and this connection's tries."""
        if count:
            self.gw.limit.failed(self.client[0], fp)
        self.failures += 1
        if self.failures == MAX_AUTH_TRIES and self.conn is not None:
            self.reason = self.reason or "unknown key"
            self.reason += f"; {MAX_AUTH_TRIES} keys refused: disconnected"
            conn = self.conn
            asyncio.get_running_loop().call_soon(
                conn.disconnect,
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE,
                "too many authentication failures",
            )
        return False

    async def _lookup(self, fp: str, login: str) -> tuple[User, str | Denied | None] | None:
        async with self.gw.app.sessions() as db:
            q = select(User).join(SshKey, SshKey.user_id == User.id).where(SshKey.fingerprint == fp)
            user = (await db.execute(q)).scalar_one_or_none()
            if user is None:
                return None
            # Resolved now, told only after the client proved the key (auth_completed).
            ref: str | Denied | None
            try:
                ref = await resolve(db, user, login)
            except Denied as exc:
                ref = exc
            db.expunge(user)
        return user, ref

    def auth_completed(self) -> None:
        assert self.user is not None and self.conn is not None
        if isinstance(self.ref, Denied):
            self.denied = str(self.ref)
            self._deny(self.user.name, self.denied)
            # Long enough for the client to open a session and read why.
            asyncio.get_running_loop().call_later(DENIED_LINGER, self.end, self.denied)
            return
        caller = caller_of(self.user)
        conn = self.conn
        entry = SshSession(
            user=self.user.name,
            workspace=self.ref or "",
            client=self._client(),
            close=conn.close,
        )
        self.link = Link(
            self.gw.app, caller, self.ref, entry, self.client, self.server, self.fingerprint
        )
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
        assert self.conn is not None
        if self.link is None:
            return self.conn.create_server_channel(encoding="utf-8"), DeniedSession(self)
        if self.link.ref is None:
            return self.conn.create_server_channel(encoding="utf-8"), DenShell(self.link)
        chan = self.conn.create_server_channel(encoding=None)
        agent.take_requests(chan, self._lend_agent)
        surface.refuse_x11(chan)
        return chan, WorkspaceSession(self.link)

    def _lend_agent(self) -> bool:
        """``ssh -A``: this connection's client consents to serve its agent."""
        if self.link is None or self.conn is None or self.link.revoked:
            return False
        if self.link.agent is None:
            self.link.agent = self.gw.agents.forwarding(self.conn, self.link)
        return True

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> Any:
        if self.link is None:
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, self.denied)
        if self.link.ref is None:
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                "forward through a workspace login: ssh -L PORT:localhost:PORT WORKSPACE@host",
            )
        return open_tunnel(self.link, dest_host, dest_port)

    def _unix_refusal(self) -> str:
        """Why this connection may not forward Unix sockets ("" if it may)."""
        if self.link is None:
            return self.denied
        if self.link.ref is None:
            return "forward Unix sockets through a workspace login: ssh -L L:/PATH WORKSPACE@host"
        return ""

    def unix_connection_requested(self, dest_path: str) -> Any:
        """``ssh -L LOCAL:/PATH``: a Unix socket inside the workspace."""
        if why := self._unix_refusal():
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, why)
        assert self.link is not None
        return open_direct(self.link, self.login, dest_path)

    def unix_server_requested(self, listen_path: str) -> Any:
        """``ssh -R /PATH:LOCAL``: a Unix socket listening inside the workspace."""
        if why := self._unix_refusal():
            log.info("ssh -R %s refused: %s", listen_path[:200], why)
            return False
        assert self.link is not None and self.conn is not None
        return self._counted(listen_remote(self.link, self.conn, self.login, listen_path))

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """``ssh -R [HOST:]PORT:...``: a listener inside the workspace."""
        assert self.conn is not None
        if self.link is None or self.link.ref is None:
            why = self.denied if self.link is None else remote.WORKSPACE_ONLY
            return remote.refuse_outside(self.conn, listen_port, why)
        return self._counted(
            remote.listen(self.link, self.conn, self.login, listen_host, listen_port)
        )

    async def _counted(self, make: Coroutine[Any, Any, Any]) -> Any:
        """The listener ``make`` makes, counted against its user's MAX_LISTENERS
        until it closes (cancelled, or its connection gone); False past them."""
        assert self.link is not None
        user = self.link.caller.name
        if not _listeners.take(user, MAX_LISTENERS):
            make.close()
            log.info("ssh -R refused: %s holds %d listeners already", user, MAX_LISTENERS)
            return False
        try:
            listener = await make
        except BaseException:
            _listeners.release(user)
            raise
        if not isinstance(listener, asyncssh.SSHListener):
            _listeners.release(user)
            return listener
        close = listener.close
        released = False

        def counted_close() -> None:
            nonlocal released
            if not released:
                released = True
                _listeners.release(user)
            close()

        listener.close = counted_close  # type: ignore[method-assign]
        return listener


class DeniedSession(asyncssh.SSHServerSession[str]):
    """A session of a connection whose login names nothing its user may enter:
    says so and exits 1."""

    def __init__(self, owner: Connection) -> None:
        self.owner = owner
        self.chan: asyncssh.SSHServerChannel[str] | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[str]) -> None:
        self.chan = chan

    def _refuse(self) -> bool:
        assert self.chan is not None
        self.chan.write_stderr(f"den: {self.owner.denied}\r\n")
        self.chan.exit(1)  # the client then closes; DENIED_LINGER ends it otherwise
        return True

    def shell_requested(self) -> bool:
        return self._refuse()

    def exec_requested(self, command: str) -> bool:
        return self._refuse()

    def subsystem_requested(self, subsystem: str) -> bool:
        return self._refuse()
