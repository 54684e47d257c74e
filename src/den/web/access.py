"""Who may open a workspace URL, and what a host leads to.

The gate asks this module on every request, so what it reads from the
database is kept for one *generation*: ``app.web_generation`` moves on after
every change to sharing, ports, domains, browser sessions, tokens, users and
workspace states (a state change is seen by the session that makes it, and
counted again when it commits), and nothing is kept longer than ``TTL``.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import event, select
from sqlalchemy.orm import Session, object_session

from den.db.models import PublishedPort, ShareUser, User, Workspace
from den.web.labels import label

if TYPE_CHECKING:
    from den.app import App

# A credential, share or state read from the database is used this long at most
# (an expired browser session or JWT stops working within it).
TTL = 10.0
_MARK = "den_ws_state_changed"
_directories: list[Directory] = []


def _forget(ws_ids: set[str]) -> None:
    for d in _directories:
        for ws_id in ws_ids:
            d.memo.forget(("ws", ws_id))


@event.listens_for(Workspace.state, "set")
def _state_set(target: Workspace, value: Any, old: Any, _initiator: Any) -> None:
    # Only that workspace's view is dropped: the others' (and every session and
    # credential) stay warm while the idle checker suspends and resumes.
    if value == old or target.id is None:
        return
    _forget({target.id})
    session = object_session(target)
    if session is not None:
        session.info.setdefault(_MARK, set()).add(target.id)


@event.listens_for(Session, "after_commit")
def _committed(session: Session) -> None:
    changed = session.info.pop(_MARK, None)
    if changed:
        _forget(changed)


@dataclass(frozen=True)
class Site:
    """What a host leads to: a workspace and a port (None: the workspace's own)."""

    ws_id: str
    owner: str
    name: str
    port: int | None


@dataclass(frozen=True)
class WsView:
    """What the gate needs of a workspace."""

    id: str
    owner_id: int
    owner: str
    owner_role: str
    name: str
    state: str
    address: str
    http_port: int
    share_mode: str
    shared_with: frozenset[int]

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.name}"


K = TypeVar("K")
V = TypeVar("V")


class Memo:
    """Values good for one generation of the app, and at most ``TTL`` seconds; at most
    ``limit`` of them, the least recently used going first."""

    def __init__(self, app: App, limit: int = 10_000) -> None:
        self.app = app
        self.limit = limit
        self._gen = -1
        self._forgets = 0  # moves on with every forget (a load across one is not kept)
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def _fresh(self) -> None:
        if self._gen != self.app.web_generation:
            self._data.clear()
            self._gen = self.app.web_generation

    @staticmethod
    def _key(key: Any) -> Any:
        # Credentials are kept by digest: the table holds no secrets and no big keys.
        if isinstance(key, tuple) and key[0] in ("session", "bearer", "link"):
            return (key[0], *(hashlib.sha256(str(k).encode()).digest() for k in key[1:]))
        return key

    def forget(self, key: Any) -> None:
        self._forgets += 1
        self._data.pop(self._key(key), None)

    def put(self, key: Any, value: Any) -> None:
        """Keep ``value`` for ``key`` now (what the caller itself just made true)."""
        self._fresh()
        k = self._key(key)
        self._data[k] = (time.monotonic(), value)
        self._data.move_to_end(k)

    def known(self, key: Any) -> bool:
        """Whether ``key`` is held now (its next get asks nothing of the database)."""
        self._fresh()
        hit = self._data.get(self._key(key))
        return hit is not None and time.monotonic() - hit[0] < TTL

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        self._fresh()
        k = self._key(key)
        hit = self._data.get(k)
        now = time.monotonic()
        if hit is not None and now - hit[0] < TTL:
            self._data.move_to_end(k)
            return hit[1]  # type: ignore[no-any-return]
        gen, forgets = self.app.web_generation, self._forgets
        value = await load()
        # Loaded across a change: good for this request only.
        if gen == self.app.web_generation and forgets == self._forgets:
            self._data[k] = (now, value)
            self._data.move_to_end(k)
            while len(self._data) > self.limit:
                self._data.popitem(last=False)
        return value


class Directory:
    """Hosts, workspaces and credentials as the gate sees them."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.memo = Memo(app)
        _directories.append(self)

    async def site(self, host: str) -> Site | None:
        """The workspace (and port) a host leads to; None for a host den does not serve."""
        domain = self.app.settings.domain
        if not host.endswith("." + domain):
            # Not kept here: any name can be asked for, and domain_target answers
            # from a table of its own without the database.
            return await self._custom(host)
        hosts = await self.memo.get("hosts", self._hosts)
        return hosts.get(host[: -len(domain) - 1])

    async def _hosts(self) -> dict[str, Site]:
        out: dict[str, Site] = {}
        async with self.app.sessions() as db:
            rows = await db.execute(
                select(Workspace.id, Workspace.name, User.name)
                .join(User, Workspace.user_id == User.id)
                .where(Workspace.state != "deleting")
            )
            names = {wid: (owner, name) for wid, name, owner in rows}
            ports = await db.execute(select(PublishedPort.workspace_id, PublishedPort.port))
        for wid, (owner, name) in names.items():
            out[label(owner, name)] = Site(wid, owner, name, None)
        for wid, port in ports:
            if wid in names:
                owner, name = names[wid]
                out[label(owner, name, port)] = Site(wid, owner, name, port)
        return out

    async def _custom(self, host: str) -> Site | None:
        try:
            from den.services.domains import domain_target
        except ImportError:  # pragma: no cover - custom domains not built in
            return None
        target = await domain_target(self.app, host)
        if target is None:
            return None
        ws_id, port = target
        view = await self.workspace(ws_id)
        return None if view is None else Site(ws_id, view.owner, view.name, port)

    async def workspace(self, ws_id: str) -> WsView | None:
        return await self.memo.get(("ws", ws_id), lambda: self._workspace(ws_id))

    async def _workspace(self, ws_id: str) -> WsView | None:
        async with self.app.sessions() as db:
            row = (
                await db.execute(
                    select(Workspace, User)
                    .join(User, Workspace.user_id == User.id)
                    .where(Workspace.id == ws_id)
                )
            ).first()
            if row is None:
                return None
            ws, owner = row
            shared = await db.execute(
                select(ShareUser.user_id).where(ShareUser.workspace_id == ws_id)
            )
            return WsView(
                id=ws.id,
                owner_id=owner.id,
                owner=owner.name,
                owner_role=owner.role,
                name=ws.name,
                state=ws.state,
                address=ws.address or "",
                http_port=ws.http_port,
                share_mode=ws.share_mode,
                shared_with=frozenset(uid for (uid,) in shared),
            )
