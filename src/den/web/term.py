"""The terminal in the browser: xterm.js over a websocket into a login shell in a
workspace, run by the same machinery as an SSH session's (den.ssh.pty).

``GET /terminal/OWNER/NAME`` is the page; its script (static/term.js) opens the
websocket ``/_den/term/OWNER/NAME`` (``?attach=ID&key=KEY`` to re-attach).
Only the signed-in owner (or an admin) gets either; the websocket also only
from den's own page (``same_origin``: no other site may open one with the
browser's cookie).

Protocol on the websocket:

- binary frames carry the terminal's bytes, both ways (keystrokes in, output out);
- text frames are JSON control messages. Client to server:
  ``{"type": "resize", "cols": C, "rows": R}``. Server to client, first
  ``{"type": "attached", "id": ID, "key": KEY, "resumed": BOOL}`` (``resumed``:
  the same shell as before, its last 64 KiB of output replayed next), at the
  end ``{"type": "exit", "code": N}`` (N: the shell's exit status, 128+S when
  signal S ended it) or ``{"type": "error", "message": M}`` when it could not
  start;
- close codes: 4000 the shell ended, 4001 another page re-attached to it,
  4003 the browser's session or user is gone. After these a page does not
  reconnect; after any other close it may re-attach once.

A terminal is an entry of ``app.ssh_sessions`` of kind ``web`` (``den sessions``
lists it, ``den kill ID`` hangs its shell up), holds one of the user's
``ssh_max_sessions`` slots, counts its bytes and its traffic as the
workspace's activity, and a keystroke thaws a frozen workspace. When its page
goes away the shell keeps running for ``web_terminal_grace`` seconds, its
output kept (the last 64 KiB), for a page with the terminal's id and key to
re-attach; then it is hung up (SIGHUP; SIGKILL if it outlives that).
The browser's session is re-checked every few seconds while attached, and a
revocation (user deleted, a key removed, admin rights gone for another's
workspace) ends the terminal at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import secrets
import signal
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from den import tasks
from den.db.models import AuditEvent
from den.errors import Conflict, DenError
from den.rpc.registry import Right
from den.services.account import login_account
from den.ssh import pty
from den.ssh.table import SshSession
from den.ssh.target import NAME_RE, Ready, ready
from den.web import pages
from den.web.dash.base import Browser, call, render, same_origin, signed_in, user_of

if TYPE_CHECKING:
    from den.app import App
    from den.rpc.registry import Caller
    from den.services.revocation import Revoked

log = logging.getLogger(__name__)
KEEP = 64 * 1024  # output kept for a page that re-attaches
HIGH_WATER = 1 << 20  # output waiting for a slow page: past this, the shell waits
RECHECK_SECONDS = 5.0  # how often an attached page's browser session is checked again
KILL_AFTER = 5.0  # a hung-up shell still running after this is killed
MAX_FRAME = 1 << 20
ENDED, ELSEWHERE, REVOKED = 4000, 4001, 4003
MAX_SIZE = 1000  # columns or rows
_live: dict[str, Terminal] = {}  # session id: the terminals of this daemon


class Peer:
    """One websocket attached to a terminal, and the output waiting to go to it."""

    def __init__(self, sock: web.WebSocketResponse, pending: bytes) -> None:
        self.sock = sock
        self.pending = bytearray(pending)
        self.wakeup = asyncio.Event()
        self.full = False  # the shell's output is paused for this one
        self.kick: tuple[int, str] | None = None  # close with (code, why)

    def push(self, data: bytes) -> bool:
        """Queue ``data``; whether the queue is over the high water mark."""
        self.pending += data
        self.wakeup.set()
        return len(self.pending) > HIGH_WATER


class Terminal:
    """A login shell on a terminal in a workspace, for one user's browser; it
    outlives a page by the grace period."""

    def __init__(self, app: App, caller: Caller, ref: str, client: str) -> None:
        self.app = app
        self.caller = caller
        self.ref = ref
        self.key = secrets.token_urlsafe(32)
        self.entry = SshSession(user=caller.name, workspace=ref, client=client, close=self.kill)
        self.entry.opened("web")
        self.size: pty.Size = (80, 24, 0, 0)
        self.tail = bytearray()
        self.early: list[bytes] = []  # keystrokes before the shell ran
        self.peer: Peer | None = None
        self.pty: pty.Pty | None = None
        self.ws: Ready | None = None
        self.code: int | None = None
        self.error: str | None = None
        self.ended = False
        self.hung_up = False
        self.writable = asyncio.Event()  # the shell takes input (not backed up)
        self.writable.set()
        self._slot = False
        self._grace: asyncio.TimerHandle | None = None
        self._frozen_check = 0.0
        self._wake_later = False
        self._unsubscribe = app.revocations.subscribe(self._revoked)
        app.ssh_sessions.add(self.entry)
        _live[self.entry.id] = self

    # -- the shell ----------------------------------------------------------------------
    async def run(self) -> None:
        """Start the shell and relay it until it ends; then let go of everything."""
        app, user = self.app, self.caller.name
        try:
            limit = app.settings.ssh_max_sessions
            if not pty.SLOTS.take(user, limit):
                raise Conflict(
                    f"busy: {limit} sessions are running for {user} (ssh_max_sessions); "
                    "end some (`den sessions`, `den kill`) and try again"
                )
            self._slot = True
            ws = self.ws = await ready(app, self.caller, self.ref)
            if self.hung_up:
                return
            acct = await login_account(app, ws.spec)
            term = self.pty = pty.Pty(app, ws)
            if self.hung_up:
                term.kill(signal.SIGHUP)
            env = pty.login_env(acct) | {"TERM": "xterm-256color", "COLORTERM": "truecolor"}
            try:
                await term.start([acct.shell, "-l"], env, acct, self.size)
                term.attach(self._out, self.writable.clear, self.writable.set)
                for data in self.early:
                    term.write(data)
                self.early.clear()
                rc = await term.wait()
            finally:
                await term.close()
            self.code = rc if rc >= 0 else 128 - rc
        except DenError as exc:
            self.error = exc.message
        except Exception:
            log.exception("browser terminal failed", extra={"ctx": {"user": user}})
            self.error = "internal error (see the daemon's log)"
        finally:
            self._finish()

    def _finish(self) -> None:
        self.ended = True
        if self._slot:
            pty.SLOTS.release(self.caller.name)
            self._slot = False
        if self._grace is not None:
            self._grace.cancel()
        self._unsubscribe()
        self.app.ssh_sessions.remove(self.entry)
        _live.pop(self.entry.id, None)
        self.writable.set()
        if self.peer is not None:
            self.peer.wakeup.set()
        log.info(
            "browser terminal ended",
            extra={"ctx": {"user": self.caller.name, "session": self.entry.id, "rc": self.code}},
        )

    def _out(self, data: bytes) -> None:
        self.entry.bytes_out += len(data)
        if self.ws is not None:
            self.app.activity.touch(self.ws.ws_id, "web")
        self.tail += data
        if len(self.tail) > KEEP:
            del self.tail[: len(self.tail) - KEEP]
        peer = self.peer
        if peer is not None and peer.push(data) and not peer.full and self.pty is not None:
            peer.full = True
            self.pty.pause()

    def _input(self, data: bytes) -> None:
        self.entry.bytes_in += len(data)
        if self.ws is not None:
            self.app.activity.touch(self.ws.ws_id, "web")
            self._wake(self.ws)
        if self.pty is not None and self.pty.stdin is not None:
            self.pty.write(data)
        elif sum(map(len, self.early)) < KEEP:
            self.early.append(data)

    def _control(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if not isinstance(msg, dict) or msg.get("type") != "resize":
            return
        cols, rows = msg.get("cols"), msg.get("rows")
        if not (isinstance(cols, int) and isinstance(rows, int)):
            return
        if 0 < cols <= MAX_SIZE and 0 < rows <= MAX_SIZE:
            self.size = (cols, rows, 0, 0)
            if self.pty is not None:
                self.pty.resize(self.size)

    def _wake(self, ws: Ready) -> None:
        """A keystroke thaws a frozen workspace. The check reads the cgroup: at most
        once a second, and a keystroke in between is checked at the end of that second
        (the keystrokes right after a freeze must wake it too)."""
        loop = asyncio.get_running_loop()
        wait = self._frozen_check + 1.0 - loop.time()
        if wait <= 0:
            self._frozen_check = loop.time()
            pty.wake(self.app, self.caller, self.ref, ws)
        elif not self._wake_later:
            self._wake_later = True
            loop.call_later(wait, self._wake_deferred, ws)

    def _wake_deferred(self, ws: Ready) -> None:
        self._wake_later = False
        if not self.ended:
            self._wake(ws)

    # -- ending -------------------------------------------------------------------------
    def kill(self) -> None:
        """Hang the shell up (``den kill``, the grace over, a revocation); the page is
        told when it has ended."""
        if self.hung_up or self.ended:
            return
        self.hung_up = True
        if self.pty is not None:
            self.pty.kill(signal.SIGHUP)
        asyncio.get_running_loop().call_later(KILL_AFTER, self._kill_hard)

    def _kill_hard(self) -> None:
        if not self.ended and self.pty is not None:
            self.pty.kill(signal.SIGKILL)

    def revoke(self, why: str) -> None:
        """The user may no longer have this terminal: close the page now, end the shell."""
        if self.peer is not None:
            self.peer.kick = (REVOKED, why)
            self.peer.wakeup.set()
        self.kill()

    def _revoked(self, ev: Revoked) -> None:
        if ev.user_id != self.caller.user_id:
            return
        if ev.kind in ("user", "key"):  # a removed key signs all the user's browsers out
            self.revoke("signed out")
        elif ev.kind == "role":
            owner = self.ref.partition("/")[0]
            if owner != self.caller.name and ev.role != "admin":
                self.revoke(f"{self.caller.name} may no longer enter {self.ref}")
            else:  # the rights of today's role from now on (a wake calls the registry)
                right = Right.admin if ev.role == "admin" else Right.write
                self.caller = dataclasses.replace(self.caller, role=ev.role, right=right)

    # -- pages ----------------------------------------------------------------------------
    async def serve(self, sock: web.WebSocketResponse, b: Browser, resumed: bool) -> None:
        """Relay between the shell and ``sock`` until either ends."""
        old = self.peer
        if old is not None:
            old.kick = (ELSEWHERE, "attached elsewhere")
            old.wakeup.set()
            if old.full:
                # The shell was paused for that slow page, which gets nothing more:
                # the new one would otherwise never see output again.
                old.full = False
                if self.pty is not None:
                    self.pty.resume()
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        # The replay is queued before anything new can be (no gap, no repeat).
        peer = self.peer = Peer(sock, bytes(self.tail) if resumed else b"")
        hello = {"type": "attached", "id": self.entry.id, "key": self.key, "resumed": resumed}
        sender = tasks.spawn(self._send(peer, hello), name=f"web-term-out-{self.entry.id}")
        checker = tasks.spawn(self._recheck(peer, b), name=f"web-term-check-{self.entry.id}")
        try:
            async for msg in sock:
                if msg.type == WSMsgType.BINARY:
                    self._input(msg.data)
                    await self.writable.wait()
                elif msg.type == WSMsgType.TEXT:
                    self._control(msg.data)
        finally:
            checker.cancel()
            if self.peer is peer:
                self.peer = None
                if peer.full and self.pty is not None:
                    self.pty.resume()
                if not self.ended:
                    self._detached()
            peer.wakeup.set()
            await sender  # it sees the socket closed, or closes it

    def _detached(self) -> None:
        grace = self.app.settings.web_terminal_grace
        self._grace = asyncio.get_running_loop().call_later(grace, self.kill)

    async def _send(self, peer: Peer, hello: dict[str, object]) -> None:
        sock = peer.sock
        try:
            await sock.send_str(json.dumps(hello))
            while not sock.closed:
                while peer.pending and peer.kick is None:
                    chunk = bytes(peer.pending)
                    peer.pending.clear()
                    if peer.full and self.pty is not None:
                        peer.full = False
                        self.pty.resume()
                    await sock.send_bytes(chunk)
                if peer.kick is not None:
                    code, why = peer.kick
                    await sock.close(code=code, message=why.encode())
                    return
                if self.ended:
                    end: dict[str, object] = (
                        {"type": "error", "message": self.error}
                        if self.error is not None
                        else {"type": "exit", "code": self.code}
                    )
                    await sock.send_str(json.dumps(end))
                    await sock.close(code=ENDED, message=b"ended")
                    return
                await peer.wakeup.wait()
                peer.wakeup.clear()
        except (ConnectionError, RuntimeError):
            return  # the page went away meanwhile

    async def _recheck(self, peer: Peer, b: Browser) -> None:
        """The browser's session, asked of the database again (a revoked or expired one
        ends the terminal; not the gate's memo)."""
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            who = await user_of(self.app, b.cookies, b.remote)
            if who is None or who.user_id != self.caller.user_id:
                self.revoke("signed out")
                return


def _ref(request: web.Request, b: Browser) -> str | None:
    """OWNER/NAME of the request, if it is one the browser's user may open a terminal in."""
    owner, name = request.match_info["owner"], request.match_info["name"]
    assert b.caller is not None
    if not (NAME_RE.fullmatch(owner) and NAME_RE.fullmatch(name)):
        return None
    if owner != b.caller.name and not b.caller.is_admin:
        return None
    return f"{owner}/{name}"


async def page_handler(request: web.Request) -> web.StreamResponse:
    b = await signed_in(request)
    ref = _ref(request, b)
    if ref is None:
        return pages.not_found()
    try:
        ws = await call(b, "workspace.get", {"ref": ref})
    except DenError:
        return pages.not_found()
    return render(request, "terminal.html", b=b, ws=ws, ref=ref, title=f"Terminal: {ref}")


async def socket_handler(request: web.Request) -> web.StreamResponse:
    b = await signed_in(request)
    if not same_origin(request, b):
        return web.Response(status=403, text="den: this websocket must come from den's own page\n")
    ref = _ref(request, b)
    if ref is None:
        return pages.not_found()
    assert b.caller is not None
    term = _attachable(
        b.app, b.caller, ref, request.query.get("attach", ""), request.query.get("key", "")
    )
    sock = web.WebSocketResponse(max_msg_size=MAX_FRAME, heartbeat=30.0)
    await sock.prepare(request)
    resumed = term is not None
    if term is None:
        term = Terminal(b.app, b.caller, ref, b.remote)
        log.info(
            "browser terminal",
            extra={"ctx": {"user": b.caller.name, "target": ref, "session": term.entry.id}},
        )
        tasks.spawn(term.run(), name=f"web-term-{term.entry.id}")
        tasks.spawn(_audit(term), name=f"web-term-audit-{term.entry.id}")
    await term.serve(sock, b, resumed)
    return sock


def _attachable(app: App, caller: Caller, ref: str, sid: str, key: str) -> Terminal | None:
    """The live terminal ``?attach=ID&key=KEY`` names, when it is this user's, in this
    workspace, and the key is its own; else None (a new shell is started)."""
    term = _live.get(sid) if sid else None
    if term is None or term.app is not app or term.ended or term.hung_up:
        return None
    if term.caller.user_id != caller.user_id or term.ref != ref:
        return None
    return term if hmac.compare_digest(key.encode(), term.key.encode()) else None


async def _audit(term: Terminal) -> None:
    """A terminal opened is a login into the workspace: in the audit log, as ssh's are."""
    params = {"client": term.entry.client, "session": term.entry.id}
    async with term.app.sessions() as db:
        db.add(
            AuditEvent(
                actor=term.caller.name[:64],
                via="web",
                method="web.terminal",
                target=f"workspace:{term.ref}",
                params=params,
                outcome="ok",
                error="",
                duration_ms=0.0,
            )
        )
        await db.commit()


def add_routes(router: web.UrlDispatcher, prefix: str) -> None:
    router.add_get(prefix + "/terminal/{owner}/{name}", page_handler)
    router.add_get(prefix + "/_den/term/{owner}/{name}", socket_handler)
