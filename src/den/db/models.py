"""The state database: desired state of every den object."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every database (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="member")
    display_name: Mapped[str] = mapped_column(String(200), default="")
    # git's user.email inside the user's workspaces ("" : none set).
    email: Mapped[str] = mapped_column(String(254), default="", server_default="")
    # Dotfiles repository cloned into each new workspace of the user ("" : none).
    dotfiles_url: Mapped[str] = mapped_column(String(2048), default="", server_default="")
    account: Mapped[str] = mapped_column(String(64), unique=True)
    uid: Mapped[int | None] = mapped_column(Integer, unique=True)
    subuid_start: Mapped[int | None] = mapped_column(Integer)
    subuid_count: Mapped[int | None] = mapped_column(Integer)
    max_workspaces: Mapped[int | None] = mapped_column(Integer)
    max_cpu: Mapped[int | None] = mapped_column(Integer)
    max_memory_mb: Mapped[int | None] = mapped_column(Integer)
    max_disk_mb: Mapped[int | None] = mapped_column(Integer)
    idle_suspend: Mapped[int | None] = mapped_column(Integer)
    idle_stop: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    keys: Mapped[list[SshKey]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )
    tokens: Mapped[list[Token]] = relationship(
        back_populates="user", cascade="all, delete-orphan", passive_deletes=True
    )


class SshKey(Base):
    __tablename__ = "ssh_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    fingerprint: Mapped[str] = mapped_column(String(80), unique=True)
    algorithm: Mapped[str] = mapped_column(String(64))
    public_key: Mapped[str] = mapped_column(Text)
    comment: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    user: Mapped[User] = relationship(back_populates="keys")


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    right: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()

    user: Mapped[User] = relationship(back_populates="tokens")


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64), index=True)
    via: Mapped[str] = mapped_column(String(16))
    method: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str] = mapped_column(String(200), default="", index=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    outcome: Mapped[str] = mapped_column(String(32))
    error: Mapped[str] = mapped_column(Text, default="")
    duration_ms: Mapped[float] = mapped_column(default=0.0)


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(32))  # debootstrap | import
    suite: Mapped[str] = mapped_column(String(64), default="")
    includes: Mapped[list[str]] = mapped_column(JSON, default=list)
    state: Mapped[str] = mapped_column(String(16), default="building")  # building|ready|failed
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Workspace(Base):
    __tablename__ = "workspaces"
    __table_args__ = (UniqueConstraint("user_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    image: Mapped[str] = mapped_column(String(64), index=True)
    backend: Mapped[str] = mapped_column(String(32), default="sandbox")
    state: Mapped[str] = mapped_column(String(16), default="creating")
    state_reason: Mapped[str] = mapped_column(Text, default="")
    backend_state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    cpu: Mapped[float] = mapped_column(default=1.0)
    memory_mb: Mapped[int] = mapped_column(Integer, default=1024)
    pids: Mapped[int] = mapped_column(Integer, default=1024)
    disk_mb: Mapped[int | None] = mapped_column(Integer)
    address: Mapped[str | None] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_activity_at: Mapped[datetime | None] = mapped_column()
    last_activity_kind: Mapped[str] = mapped_column(String(32), default="")
    # Idle policy in seconds; None: the owner's default, then the global one; 0: never.
    idle_suspend: Mapped[int | None] = mapped_column(Integer)
    idle_stop: Mapped[int | None] = mapped_column(Integer)
    # Dotfiles installed at create (den.services.dotfiles): the repository, how
    # the last run went (""|running|ok|failed) and the tail of its output.
    dotfiles_url: Mapped[str] = mapped_column(String(2048), default="", server_default="")
    dotfiles_state: Mapped[str] = mapped_column(String(16), default="", server_default="")
    dotfiles_log: Mapped[str] = mapped_column(Text, default="", server_default="")
    dotfiles_at: Mapped[datetime | None] = mapped_column()
    # The web front door (den.web): the port its URL proxies to, and who may
    # open its URLs (private | users | public; share links work in every mode).
    http_port: Mapped[int] = mapped_column(Integer, default=8080, server_default="8080")
    share_mode: Mapped[str] = mapped_column(String(16), default="private", server_default="private")
    # The compute manager's VM times (den.services.vm): when it last went to
    # running, and when it last left it (stopped, suspended or failed); kept by
    # _note_run_times on every change of state.
    started_at: Mapped[datetime | None] = mapped_column()
    stopped_at: Mapped[datetime | None] = mapped_column()

    user: Mapped[User] = relationship()


_DOWN_STATES = frozenset({"stopped", "suspended", "failed"})


@event.listens_for(Workspace.state, "set")
def _note_run_times(ws: Workspace, value: str, old: object, _initiator: object) -> None:
    """Keep started_at/stopped_at with the state, wherever den assigns it (create,
    start, restart, resume, stop, suspend, idle, reconciler): one place, so no
    path that changes a workspace's state can forget them. (A restart assigns
    "running" again and counts as a start.)"""
    if value == "running":
        ws.started_at, ws.stopped_at = utcnow(), None
    elif value in _DOWN_STATES and value != old:
        ws.stopped_at = utcnow()


class MetricSample(Base):
    """One sample of a workspace's resource use (a bounded time series)."""

    __tablename__ = "metric_samples"
    __table_args__ = (Index("ix_metric_samples_ws_at", "workspace_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(32))
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    cpu_seconds: Mapped[float] = mapped_column(default=0.0)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    pids: Mapped[int] = mapped_column(Integer, default=0)
    net_rx_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    net_tx_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    disk_bytes: Mapped[int | None] = mapped_column(BigInteger)


class EgressRule(Base):
    """An admin's exception to the default egress policy (allow or deny a destination).

    Scope: every workspace (no user, no workspace), a user's workspaces, or one
    workspace; rules go with the user or workspace they name.
    """

    __tablename__ = "egress_rules"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str] = mapped_column(String(8))  # allow | deny
    dest: Mapped[str] = mapped_column(String(64))  # an IPv4 CIDR
    proto: Mapped[str | None] = mapped_column(String(8))  # tcp | udp | None: every protocol
    port: Mapped[int | None] = mapped_column(Integer)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    workspace_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    note: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ShareUser(Base):
    """A den user a workspace is shared with (its URLs, in share mode ``users``)."""

    __tablename__ = "share_users"

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ShareLink(Base):
    """A secret link to a workspace's URLs: whoever holds it gets in until it is revoked."""

    __tablename__ = "share_links"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    secret_hash: Mapped[str] = mapped_column(String(128))
    note: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()


class PublishedPort(Base):
    """A further port of a workspace with a URL of its own."""

    __tablename__ = "published_ports"

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    port: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BrowserSession(Base):
    """A browser signed in as a den user (the cookie holds ``id`` and a secret)."""

    __tablename__ = "browser_sessions"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    client: Mapped[str] = mapped_column(String(64), default="")
    agent: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    last_seen_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    # Signed in on den's own TCP listener: valid from this client address alone (a
    # host-only cookie reaches every port of the host); None: signed in through Caddy.
    bound_client: Mapped[str | None] = mapped_column(String(64))


class LoginLink(Base):
    """A one-time link that signs a browser in as a den user (short-lived, single use)."""

    __tablename__ = "login_links"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    secret_hash: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()
    used_at: Mapped[datetime | None] = mapped_column()


class CustomDomain(Base):
    """A domain of the owner's that serves a workspace once verified."""

    __tablename__ = "custom_domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    domain: Mapped[str] = mapped_column(String(253), unique=True)
    port: Mapped[int | None] = mapped_column(Integer)  # None: the workspace's http_port
    token: Mapped[str] = mapped_column(String(64))  # the public verification value
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    verified_at: Mapped[datetime | None] = mapped_column()
    verified_by: Mapped[str] = mapped_column(String(16), default="")  # txt


class DomainHold(Base):
    """A verified custom domain kept for its owner a while after its claim went
    (``den domain rm``, or the workspace deleted): another owner may not claim it
    meanwhile (den.services.domains)."""

    __tablename__ = "domain_holds"

    domain: Mapped[str] = mapped_column(String(253), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    until: Mapped[datetime] = mapped_column()


class UiAllow(Base):
    """An address or network allowed to reach den's dashboard and API over TCP
    (``den ui allow``); none at all: every address may (den.web.allow)."""

    __tablename__ = "ui_allow"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    network: Mapped[str] = mapped_column(String(64), unique=True)  # a CIDR, host bits clear
    note: Mapped[str] = mapped_column(String(200), default="")
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# -- LLM gateway (den.llm) ------------------------------------------------------


class LlmProvider(Base):
    """An upstream OpenAI-compatible API the gateway forwards to (``den llm provider add``)."""

    __tablename__ = "llm_providers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    base_url: Mapped[str] = mapped_column(String(2000))
    # The provider's API key, sealed (den.secretbox, purpose "llm-provider:NAME").
    key_sealed: Mapped[str] = mapped_column(Text)
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LlmBudget(Base):
    """A user's own daily LLM budget; a None limit means the settings' default (0: none)."""

    __tablename__ = "llm_budgets"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger)
    requests_per_day: Mapped[int | None] = mapped_column(BigInteger)


class LlmUsage(Base):
    """What one user's workspaces asked of one model on one UTC day."""

    __tablename__ = "llm_usage"

    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[str] = mapped_column(String(10), primary_key=True)  # YYYY-MM-DD, UTC
    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(200), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    # Requests whose upstream gave no usage figures (their tokens are den's estimate).
    unmetered: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


# -- the metadata service (den.meta): environment variables and busy leases ------------


class EnvVar(Base):
    """A variable /v1/env gives a workspace: set for it, or for all of a user's.

    ``scope`` is "ws:ID" or "user:ID" (the uniqueness key); the value is sealed
    (den.secretbox, purpose "env:SCOPE:KEY").
    """

    __tablename__ = "env_vars"
    __table_args__ = (UniqueConstraint("scope", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(64))
    ws_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    key: Mapped[str] = mapped_column(String(128))
    value_sealed: Mapped[str] = mapped_column(Text)
    updated_by: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class BusyLease(Base):
    """A workspace held awake until ``until`` (POST /v1/busy): the idle checker waits."""

    __tablename__ = "busy_leases"

    ws_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    until: Mapped[datetime] = mapped_column()
    by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeNetObject(Base):
    """A host network object net.* made (route, bridge, port, tap, rule, NAT): restored at start."""

    __tablename__ = "node_net_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)  # what identifies it in the kernel
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# -- the node API's storage (vol.*) --------------------------------------------------


class VolMount(Base):
    """A mount vol.mount made: restored when den starts, the only kind vol.unmount undoes."""

    __tablename__ = "vol_mounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mount_point: Mapped[str] = mapped_column(String(255), unique=True)
    device: Mapped[str] = mapped_column(String(255))
    fstype: Mapped[str] = mapped_column(String(32))
    # The filesystem's UUID at mount time: a device name reused by another disk
    # (a loop device attached anew) is not the filesystem den mounted.
    uuid: Mapped[str] = mapped_column(String(64), default="")
    options: Mapped[str] = mapped_column(String(255), default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# -- groups and the node ACL (den.rpc.acl) ----------------------------------------


class AclGroup(Base):
    """A group of den users and of other groups (nested), named in node ACL entries.

    ``source`` is "api" (made with group.create) or "file" (declared in acl.toml,
    replaced from it at each load and read-only through the API)."""

    __tablename__ = "acl_groups"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    description: Mapped[str] = mapped_column(String(200), default="")
    source: Mapped[str] = mapped_column(String(8), default="api")
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AclMember(Base):
    """One member of a group: a user or a group (exactly one of the two is set)."""

    __tablename__ = "acl_members"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int] = mapped_column(
        ForeignKey("acl_groups.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    member_group_id: Mapped[int | None] = mapped_column(
        ForeignKey("acl_groups.id", ondelete="CASCADE"), index=True
    )
    source: Mapped[str] = mapped_column(String(8), default="api")


class AclEntry(Base):
    """A grant of a right (read, write, admin) on a node method pattern to a principal:
    a group, a user, or anonymous callers ("local": the unix socket, "remote": TCP)."""

    __tablename__ = "acl_entries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    group_id: Mapped[int | None] = mapped_column(
        ForeignKey("acl_groups.id", ondelete="CASCADE"), index=True
    )
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    anonymous: Mapped[str | None] = mapped_column(String(8))  # "local" or "remote"
    pattern: Mapped[str] = mapped_column(String(128))
    right: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(8), default="api")
    created_by: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
