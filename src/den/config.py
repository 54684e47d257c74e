"""den's configuration: embedded defaults, ``/etc/den/den.toml``, ``DEN_*``.

Precedence, highest first: explicit overrides (command-line flags), the
environment (``DEN_<OPTION>``), the TOML file, the embedded defaults. An
instance number N > 0 suffixes every path and shifts every port by N unless
that option was set explicitly.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_CONFIG_FILE = Path("/etc/den/den.toml")


class Settings(BaseSettings):
    """Every option den reads. Each has a default, a type and a help line."""

    model_config = SettingsConfigDict(env_prefix="DEN_", extra="forbid", validate_default=True)

    instance: int = Field(
        0, ge=0, le=99, description="Instance number: paths get suffixed and ports shifted by it."
    )
    data_dir: Path = Field(
        Path("/var/lib/den"), description="Directory for the database, the pool and keys."
    )
    socket: Path = Field(Path("/run/den/den.sock"), description="Unix socket of the JSON-RPC API.")
    socket_group: str = Field(
        "den", description="Group that owns the API socket; den users are its members."
    )
    socket_mode: int = Field(
        0o660, ge=0, le=0o7777, description="Permission bits of the API socket, in octal (0660)."
    )
    http_host: str = Field(
        "127.0.0.1", description="Address of the HTTP listener (API over TCP, dashboard)."
    )
    http_port: int = Field(
        8780, ge=0, le=65535, description="Port of the HTTP listener; 0 picks a free port."
    )
    http_overlay: str = Field(
        "auto",
        description="Also serve the HTTP listener on an overlay network address: auto (the "
        "host's first global address in 400::/7, Mycelium's range, if any), off, or an IPv6 "
        "address of the host.",
    )

    @field_validator("http_overlay")
    @classmethod
    def _overlay(cls, v: str) -> str:
        import ipaddress

        v = v.strip().lower()
        if v in ("auto", "off"):
            return v
        try:
            return str(ipaddress.IPv6Address(v))
        except ValueError:
            raise ValueError("expected auto, off or an IPv6 address of this host") from None

    ssh_port: int = Field(
        2222, ge=0, le=65535, description="Port of the SSH gateway; 0 picks a free port."
    )
    ssh_host: str = Field("0.0.0.0", description="Address the SSH gateway listens on.")
    ssh_user: str = Field(
        "",
        max_length=64,
        description="Account inside every workspace that ssh, sftp, exec and code.push run as; "
        "empty: the owner's own account (root where a workspace has none); root: as before "
        "den made accounts.",
    )
    ssh_start_stopped: bool = Field(
        True,
        description="An ssh connection to a stopped workspace starts it (suspended: always resumed).",
    )
    ssh_max_failures: int = Field(
        20,
        ge=1,
        description="Refusals of one key from one address within ssh_failure_window before that key is blocked there.",
    )
    ssh_failure_window: float = Field(
        300.0,
        gt=0,
        description="Seconds over which failed ssh logins are counted, and a block lasts.",
    )
    ssh_accept_env: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Environment variables an ssh client may set in a session besides LANG "
        "and LC_*, as OpenSSH's AcceptEnv: names or globs (GIT_*); others are ignored.",
    )

    @field_validator("ssh_accept_env")
    @classmethod
    def _env_patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            chars_ok = all(c.isascii() and (c.isalnum() or c in "_*?") for c in p)
            if not 0 < len(p) <= 128 or not chars_ok:
                raise ValueError(f"{p!r} is not a variable name or glob (letters, digits, _ * ?)")
        return v

    ssh_max_sessions: int = Field(
        128,
        ge=1,
        le=100_000,
        description="Shell, command and sftp sessions one den user may run at once over ssh "
        "(each keeps host processes while its command runs).",
    )
    ssh_forward_open_seconds: float = Field(
        30.0,
        ge=1,
        le=3600,
        description="A connection forwarded to the client (ssh -R, an agent) whose channel "
        "the client has not confirmed by then is closed inside the workspace.",
    )
    api_max_auth_failures: int = Field(
        20,
        ge=1,
        le=1_000_000,
        description="Failed API token checks from one address within api_auth_failure_window before its failures are held off.",
    )
    api_auth_failure_window: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="Seconds over which failed API token checks are counted, and a hold lasts.",
    )
    database_url: str = Field(
        "",
        description="SQLAlchemy URL of the state database; empty means SQLite at DATA_DIR/den.db.",
    )
    account_prefix: str = Field(
        "den-",
        pattern=r"^[a-z][a-z0-9]{0,7}-$",
        description="Prefix of the host Linux account of each den user (den-<name>).",
    )
    pool_size: str = Field(
        "50G",
        pattern=r"^[0-9]+[KMGT]?$",
        description="Size of the sparse loopback pool image, if one is made.",
    )
    storage_driver: Literal["auto", "btrfs", "overlay"] = Field(
        "auto", description="auto: btrfs when the pool is on btrfs, else the overlayfs fallback."
    )
    disk_quota: bool = Field(
        True,
        description="Give every workspace a disk limit (btrfs simple quotas on Linux 6.7+, "
        "else full qgroups); "
        "false: no disk limits at all.",
    )
    # 10G holds a toolchain, dependencies and build output of a typical repo, and
    # was twice what the member who filled the pool wrote; what the image shares
    # is not counted. A 50G pool (pool_size) holds five full ones.
    default_disk: str = Field(
        "10G",
        pattern=r"^[0-9]{1,9}[KMGT]?$",
        description="Disk limit of a new workspace unless --disk is given (disk_quota = true).",
    )
    fstab: Path = Field(
        Path("/etc/fstab"), description="Where den records the pool mount for reboots."
    )
    code_mount: Path | None = Field(
        None,
        description="Bind-mount the shared code tree here on the host (e.g. /code); unset: not.",
    )
    # The node API (vol.mount) mounts only below these directories: never over
    # the host's own tree (/, /usr, /etc...).
    vol_mount_roots: list[Path] = Field(
        [Path("/mnt"), Path("/srv")],
        description="Directories below which vol.mount may mount (absolute paths).",
    )
    # -- the web front door (den.web): Caddy in front, den decides ------------------
    web: bool = Field(
        True,
        description="Serve workspace URLs over HTTPS: den starts Caddy as its child and answers "
        "its access checks.",
    )
    domain: str = Field(
        "den.localhost",
        min_length=1,
        max_length=200,
        pattern=r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$",
        description="Domain of workspace URLs: each workspace is LABEL.DOMAIN (a wildcard DNS "
        "record points them here; *.localhost needs none).",
    )
    https_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="HTTPS port of workspace URLs (default 8443 for *.localhost, 443 otherwise).",
    )
    https_host: str | None = Field(
        None,
        description="Address Caddy listens on (default 127.0.0.1 for *.localhost, every address "
        "otherwise).",
    )
    tls: Literal["internal", "acme"] = Field(
        "internal",
        description="Certificates: internal (Caddy's own CA; `den ca` prints its root) or acme "
        "(Let's Encrypt, issued on demand for names den serves).",
    )
    acme_email: str = Field("", max_length=254, description="Contact address for the ACME account.")
    acme_ca: str = Field(
        "", max_length=500, description="ACME directory URL (default: Let's Encrypt production)."
    )
    caddy_bin: Path = Field(Path("/usr/bin/caddy"), description="The Caddy program den runs.")
    web_default_port: int = Field(
        8080, ge=1, le=65535, description="Port a new workspace's URL proxies to."
    )
    web_start_stopped: bool = Field(
        False,
        description="A request to a stopped workspace's URL starts it (suspended ones are "
        "always resumed).",
    )
    web_session_days: float = Field(
        14.0, gt=0, le=366, description="Days a browser stays signed in."
    )
    web_terminal_grace: float = Field(
        60.0,
        ge=0,
        le=86400,
        description="Seconds a browser terminal's shell outlives its closed page, for the page "
        "to re-attach to it (then it is hung up).",
    )
    login_link_seconds: int = Field(
        300, ge=10, le=86400, description="Seconds a one-time login link stays valid."
    )
    oauth_enabled: bool = Field(
        False, description="Accept JWTs signed by a key of oauth_jwks_url as bearer credentials."
    )
    oauth_jwks_url: str = Field("", max_length=2000, description="URL of the issuer's JWKS.")
    oauth_issuer: str = Field("", max_length=2000, description="Required `iss` of a JWT.")
    oauth_audience: str = Field("", max_length=2000, description="Required `aud` of a JWT.")
    oauth_user_claim: str = Field(
        "sub", max_length=100, description="JWT claim that names the den user."
    )
    oauth_jwks_refetch_seconds: float = Field(
        30.0,
        ge=1,
        le=86400,
        description="At most one JWKS fetch this often (a token naming an unknown key).",
    )
    dns_servers: list[str] = Field(
        default_factory=list,
        max_length=10,
        description="Nameservers (ADDR or ADDR:PORT) for custom-domain checks; empty: the "
        "system's resolver.",
    )

    debian_mirror: str = Field(
        "", description="Debian mirror for image builds; empty: the one in the host's apt sources."
    )
    network_subnet: str = Field(
        "10.77.0.0/16",
        description="Private subnet of workspace addresses (instance N: 10.77+N.0.0/16).",
    )
    egress: bool = Field(
        True,
        description="Let workspaces reach the internet (NAT via nftables); private, link-local "
        "and reserved ranges and the host stay closed unless `den egress allow` opens them.",
    )
    sandbox_seccomp: bool = Field(
        True,
        description="Confine workspaces with den's seccomp profile (false: no syscall filter).",
    )
    default_cpu: float = Field(1.0, gt=0, description="CPUs of a new workspace unless given.")
    default_memory: str = Field(
        "1G", pattern=r"^[0-9]+[KMGT]?$", description="Memory of a new workspace."
    )
    default_pids: int = Field(
        1024, ge=16, description="Process limit of a new workspace unless given."
    )
    default_image: str = Field(
        "dev",
        description="Image of a new workspace unless given; `den init` builds it "
        "(presets: dev, debian).",
    )
    default_backend: Literal["sandbox", "microvm"] = Field(
        "sandbox",
        description="Backend of a new workspace unless given (den new --backend): sandbox "
        "(namespaces, shares the host's kernel) or microvm (a QEMU microVM with its own "
        "kernel; `den init` prepares it).",
    )
    # The microvm backend (den.backends.microvm): `den init` builds its guest kernel and
    # initramfs and probes KVM unless it is off.
    microvm: bool = Field(
        True,
        description="Enable the microvm backend: `den init` builds its guest assets (Debian's "
        "cloud kernel, den's initramfs) and probes KVM; off: no workspace can use it.",
    )
    apt_cache: Path | None = Field(
        None,
        description="Where image builds keep the Debian packages they download, so a host "
        "fetches each once (never copied into an image); unset: DATA_DIR/apt-cache.",
    )
    # Quotas of a member whose own quota is unset (`den user set --max-...` overrides them;
    # admins get none). Shares of the host follow it when it grows.
    default_max_workspaces: int = Field(
        10, ge=-1, description="Workspaces a member may own (-1: no limit)."
    )
    default_max_cpu: str = Field(
        "200%",
        pattern=r"^(-1|[0-9]{1,6}|[0-9]{1,5}%)$",
        description="CPUs over a member's workspaces: a number or a share of the host's (-1: no limit).",
    )
    default_max_memory: str = Field(
        "50%",
        pattern=r"^(-1|[0-9]{1,15}[KMGT]?|[0-9]{1,5}%)$",
        description="Memory over a member's workspaces: a size or a share of the host's (-1: no limit).",
    )
    default_max_disk: str = Field(
        "100%",
        pattern=r"^(-1|[0-9]{1,15}[KMGT]?|[0-9]{1,5}%)$",
        description="Disk limits over a member's workspaces: a size or a share of the pool (-1: no limit).",
    )
    exec_max_output: int = Field(
        1 << 20,
        ge=4096,
        le=1 << 30,
        description="Bytes of stdout and of stderr one workspace.exec returns; the rest is dropped.",
    )
    exec_max_concurrent: int = Field(
        8, ge=1, le=10_000, description="workspace.exec calls one member may run at once."
    )
    reconcile_interval: float = Field(
        30.0, ge=0, description="Seconds between reconciler passes (0: only at start)."
    )
    idle_suspend: int = Field(
        300, ge=0, description="Suspend a workspace after this many idle seconds (0: never)."
    )
    idle_stop: int = Field(
        0, ge=0, description="Stop a workspace after this many idle seconds (0: never)."
    )
    idle_check_interval: float = Field(30.0, gt=0, description="Seconds between idle checks.")
    idle_cpu_threshold: float = Field(
        0.05, ge=0, description="CPU use (in cores) above which a workspace counts as active."
    )
    idle_net_threshold: int = Field(
        4096, ge=0, description="Bytes on a workspace's veth per check above which it is active."
    )
    metrics_interval: float = Field(5.0, gt=0, description="Seconds between metric samples.")
    metrics_retention: int = Field(
        86400, ge=60, description="Seconds of metric samples kept per workspace."
    )
    # Mail (den.mail): NAME.OWNER@mail_domain is workspace NAME of OWNER. Inbound
    # SMTP delivers to ~/Maildir inside it; outbound, 169.254.169.254:25 inside
    # every workspace relays through mail_relay with den's From.
    mail_domain: str = Field(
        "",
        max_length=200,
        pattern=r"^([a-z0-9]([a-z0-9.-]*[a-z0-9])?)?$",
        description="Mail domain of workspaces (NAME.OWNER@DOMAIN); empty: no mail at all.",
    )
    mail_host: str = Field("127.0.0.1", description="Address inbound SMTP listens on.")
    mail_port: int = Field(
        2525, ge=0, le=65535, description="Port of inbound SMTP (0 picks a free port)."
    )
    mail_max_bytes: int = Field(
        10 << 20, ge=1024, le=1 << 30, description="Largest message accepted, in or out, in bytes."
    )
    mail_max_recipients: int = Field(
        50, ge=1, le=10_000, description="Recipients of one message, in or out."
    )
    mail_max_connections: int = Field(
        64, ge=1, le=100_000, description="SMTP connections den holds at once, in and out."
    )
    mail_relay: str = Field(
        "",
        max_length=300,
        pattern=r"^(\[?[A-Za-z0-9.:-]+\]?:[0-9]{1,5})?$",
        description="HOST:PORT of the SMTP relay outbound mail goes through; empty: none "
        "(`den mail relay-login` stores its credentials, sealed).",
    )
    mail_relay_tls: Literal["auto", "starttls", "tls", "none"] = Field(
        "auto",
        description="TLS to the relay: auto (STARTTLS when offered), starttls (required), "
        "tls (from the first byte), none.",
    )
    mail_per_hour: int = Field(
        60,
        ge=0,
        le=1_000_000,
        description="Messages one user's workspaces may send per hour (0: none).",
    )
    # The LLM gateway (den.llm): daily budgets of each user unless an admin set
    # theirs (`den llm budget set`), and the limits of one request.
    llm_tokens_per_day: int = Field(
        0, ge=0, description="LLM tokens a user's workspaces may use per UTC day (0: no limit)."
    )
    llm_requests_per_day: int = Field(
        0, ge=0, description="LLM requests a user's workspaces may make per UTC day (0: no limit)."
    )
    llm_max_body_bytes: int = Field(
        4 << 20, ge=1024, le=1 << 30, description="Largest LLM gateway request body in bytes."
    )
    llm_timeout: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Seconds the LLM gateway waits for an upstream to connect or send more.",
    )
    llm_max_concurrent: int = Field(
        4, ge=1, le=10_000, description="LLM gateway requests one user may have in flight."
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="Largest accepted request body in bytes."
    )
    # The metadata service (den.meta) at 169.254.169.254 inside every workspace.
    meta_token_seconds: int = Field(
        3600, ge=60, le=86400, description="Lifetime of a workspace's scoped token (/v1/token)."
    )
    busy_max_seconds: int = Field(
        43200, ge=60, le=7 * 86400, description="Longest busy lease (POST /v1/busy?for=...)."
    )
    # The node ACL (den.rpc.acl): groups and grants for net.* and vol.*, besides the API's.
    acl_file: Path = Field(
        Path("/etc/den/acl.toml"),
        description="Groups and node ACL entries loaded at start (none: only the API's); "
        "instance N reads /etc/den/acl-N.toml unless set.",
    )

    @model_validator(mode="after")
    def _acl_file_instance(self) -> Settings:
        if self.instance and "acl_file" not in self.model_fields_set:
            self.acl_file = Path(f"/etc/den/acl-{self.instance}.toml")
        return self

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    log_file: Path | None = Field(None, description="Also write the log to this file.")

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal_mode(cls, value: Any) -> Any:
        # A string (the environment, the command line) is octal, as for chmod.
        if isinstance(value, str):
            try:
                return int(value.strip().lower().removeprefix("0o"), 8)
            except ValueError:
                raise ValueError("expected octal permission bits, like 0660") from None
        return value

    @model_validator(mode="after")
    def _apply_instance(self) -> Settings:
        n = self.instance
        if n == 0:
            return self
        explicit = self.model_fields_set
        if "data_dir" not in explicit:
            self.data_dir = Path(f"/var/lib/den-{n}")
        if "socket" not in explicit:
            self.socket = Path(f"/run/den/den-{n}.sock")
        if "socket_group" not in explicit:
            self.socket_group = f"den{n}"
        if "network_subnet" not in explicit:
            self.network_subnet = f"10.{77 + n}.0.0/16"
        if "account_prefix" not in explicit:
            self.account_prefix = f"den{n}-"
        for port in ("http_port", "ssh_port", "mail_port"):
            if port not in explicit and getattr(self, port):
                setattr(self, port, getattr(self, port) + n)
        return self

    @model_validator(mode="after")
    def _oauth_complete(self) -> Settings:
        if self.oauth_enabled:
            missing = [
                n
                for n in ("oauth_jwks_url", "oauth_issuer", "oauth_audience")
                if not getattr(self, n)
            ]
            if missing:
                raise ValueError(f"oauth_enabled needs {', '.join(missing)} set as well")
        return self

    @model_validator(mode="after")
    def _vol_roots_apart(self) -> Settings:
        # vol.mount mounts below these roots: never over den's own data (its
        # database, the pool and the workspaces' views) nor around it.
        import os

        data = os.path.realpath(self.data_dir)
        for root in self.vol_mount_roots:
            real = os.path.realpath(root)
            if not root.is_absolute():
                raise ValueError(f"vol_mount_roots: {root} is not an absolute path")
            if f"{data}/".startswith(f"{real}/") or f"{real}/".startswith(f"{data}/"):
                raise ValueError(
                    f"vol_mount_roots: {root} and den's data_dir {self.data_dir} overlap "
                    "(vol.mount could mount over den's database, pool or workspaces)"
                )
        return self

    @property
    def local_domain(self) -> bool:
        """The domain resolves to loopback everywhere (*.localhost): no DNS, no public CA."""
        return self.domain == "localhost" or self.domain.endswith(".localhost")

    @property
    def web_port(self) -> int:
        """The HTTPS port of workspace URLs (instance N: shifted by N unless set)."""
        if self.https_port is not None:
            return self.https_port
        return (8443 if self.local_domain else 443) + self.instance

    @property
    def web_host(self) -> str:
        if self.https_host is not None:
            return self.https_host
        return "127.0.0.1" if self.local_domain else ""

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'den.db'}"

    @property
    def pool_dir(self) -> Path:
        return self.data_dir / "pool"

    @property
    def pool_image(self) -> Path:
        return self.data_dir / "pool.img"

    @property
    def state_file(self) -> Path:
        """Where a running daemon writes its pid and actual listener addresses."""
        return self.data_dir / "serve.json"


def _toml_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    return TomlConfigSettingsSource(settings_cls, toml_file=path)


def config_file_path(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    return Path(os.environ.get("DEN_CONFIG", str(DEFAULT_CONFIG_FILE)))


def load(
    overrides: dict[str, Any] | None = None, config_file: Path | None = None
) -> tuple[Settings, dict[str, str]]:
    """Build the effective settings and say where each value came from.

    Returns the settings and a map option -> source ("default", "file PATH",
    "env DEN_X" or "flag").
    """
    path = config_file_path(config_file)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}

    file_values: dict[str, Any] = {}
    if path.is_file():
        try:
            file_values = _toml_source(Settings, path)()
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
    env_values = EnvSettingsSource(Settings)()

    def origin(name: str) -> str:
        if name in overrides:
            return "flag"
        if name in env_values:
            return f"env DEN_{name.upper()}"
        if name in file_values:
            return f"file {path}"
        return "default"

    class _Loaded(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path.is_file():
                sources.append(_toml_source(settings_cls, path))
            return tuple(sources)

    try:
        settings: Settings = _Loaded(**overrides)
    except ValidationError as exc:
        raise ValueError(_explain(exc, origin)) from None
    sources: dict[str, str] = {}
    for name in Settings.model_fields:
        sources[name] = origin(name)
        if sources[name] == "default" and settings.instance and name in _INSTANCE_DERIVED:
            sources[name] = f"instance {settings.instance}"
    return settings, sources


def _explain(exc: ValidationError, origin: Callable[[str], str]) -> str:
    """One line per bad option: its name, where its value came from, what is wrong."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        name = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option"
        lines.append(f"{name} ({origin(str(err['loc'][0]) if err['loc'] else '')}): {msg}")
    return "; ".join(lines)


_INSTANCE_DERIVED = {
    "data_dir",
    "socket",
    "socket_group",
    "account_prefix",
    "http_port",
    "ssh_port",
    "network_subnet",
}
