"""The backend contract.

A backend turns a workspace record into a running isolated environment and
back. The service layer decides *what* should be (the database row); the
backend makes it so. Every method receives the workspace's :class:`Spec` and
the backend's own opaque state blob (kept in the database as JSON), and
returns the new blob where it changes it.

Each method states when it may be called and whether it is idempotent. All
may be called after a daemon restart, with a blob written by an earlier
process: a backend must rediscover reality from the host, never from memory.

A subclass that leaves any abstract method unimplemented fails when its
module is imported, not later.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from den.errors import BackendFailure

if TYPE_CHECKING:
    from den.backends.seccomp import Filter
    from den.config import Settings
    from den.net.network import Network

# What a backend finds on the host (Backend.status). "failed": the workspace ended
# without den asking (a killed VM process, a guest kernel panic; Backend.failure
# says why); "stopped" is den's stop, a host restart, or an end the workspace asked
# for itself, which the reconciler starts again like a host restart.
Status = Literal["running", "suspended", "stopped", "failed", "missing"]
# The PATH of a login inside a workspace, whatever runs it.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
State = dict[str, Any]


@dataclass(frozen=True)
class Spec:
    """What a workspace should be, as the backend needs to know it."""

    id: str
    owner: str
    name: str
    image: str
    rootfs: Path  # the workspace's writable snapshot of its image (ids unshifted)
    code: Path  # its copy-on-write snapshot of the code tree
    uid_start: int  # first host id of the owner's subordinate range
    uid_count: int
    cpu: float
    memory_mb: int
    pids: int
    address: str
    hostname: str
    # The uid inside that owns what is root's on disk in the code snapshot (what
    # den cloned into the shared tree): 0, or the owner's account's uid for a
    # workspace made with that account, whose /code is then theirs (the two
    # ids trade places in the view; den.storage.idmap.swapped). Set once, at
    # create: changing it would hand the files already written to another id.
    code_owner: int = 0
    # Which backend runs it (den.backends.registry): ``ws.backend``.
    backend: str = "sandbox"


@dataclass(frozen=True)
class Terminal:
    """A pseudo-terminal's request: its TERM and its size in characters."""

    term: str = "xterm"
    cols: int = 80
    rows: int = 24


@dataclass(frozen=True)
class HostContext:
    """What every backend of one daemon shares on the host."""

    instance: int
    data_dir: Path
    volumes: Path  # the storage pool's volumes (the workspaces' snapshots)
    network: Network  # den's bridge, addresses and firewall: one per daemon
    seccomp: Filter | None  # the syscall filter of every workspace (None: off)
    settings: Settings


@dataclass
class ExecRequest:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/root"
    stdin: bytes = b""
    timeout: float = 60.0
    user: str = "root"
    max_output: int = 1 << 20  # bytes kept of stdout and of stderr each; the rest is dropped


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    truncated: bool = False  # stdout or stderr had more than ``max_output`` bytes


@dataclass(frozen=True)
class ExecExit:
    """How a streamed command ended: its exit code, or the signal that killed it
    (then ``exit_code`` is 128+N, as a shell reports it)."""

    exit_code: int
    signal: int | None = None


class ExecStream(Protocol):
    """A command running in a workspace, its streams handed over as they come.

    Output is read only as fast as the consumer calls :meth:`read`: the pipes
    fill and the command waits, so nothing is buffered without bound.
    """

    async def read(self) -> tuple[int, bytes] | None:
        """The next chunk, as (1 for stdout or 2 for stderr, bytes); None once both
        have ended (or, after the command ended, stayed silent a moment: a
        background process may keep them open)."""
        ...

    async def write(self, data: bytes) -> None:
        """Feed stdin; waits while the command does not read (dropped once it
        closed its stdin)."""
        ...

    async def close_stdin(self) -> None:
        """End of input."""
        ...

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the command (never to the workspace's init)."""
        ...

    async def wait(self) -> ExecExit:
        """Wait for the command to end."""
        ...

    async def close(self) -> None:
        """Kill the command if it still runs and free everything; idempotent."""
        ...

    def resize(self, cols: int, rows: int) -> None:
        """Set the terminal's size (a stream on a PTY; a no-op without one)."""
        ...


@dataclass
class Stats:
    cpu_seconds: float = 0.0
    memory_bytes: int = 0
    pids: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0


def unsupported(backend: str, feature: str) -> BackendFailure:
    """The error of an optional feature a backend does not offer."""
    return BackendFailure(f"the {backend} backend does not offer {feature}")


class Backend(ABC):
    """Base of every backend. Subclasses set ``name``, implement every abstract
    method, and call ``super().__init__(host)``.

    The optional features at the end (``ssh -R`` listeners, Unix sockets
    inside, watching for the workspace to stop) raise :func:`unsupported`
    unless a backend offers them.
    """

    name: ClassVar[str]

    def __init__(self, host: HostContext) -> None:
        self.host = host
        # Told a workspace's id when it is about to run processes (start) and
        # when they ended (stop, delete, remove_orphan): den.meta listens
        # inside it meanwhile. Every backend calls them.
        self.on_up: list[Callable[[str], Awaitable[None]]] = []
        self.on_down: list[Callable[[str], Awaitable[None]]] = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # ABCMeta sets __abstractmethods__ only after this hook runs: look for
        # what is still abstract by hand.
        missing = sorted(
            n for n in dir(cls) if getattr(getattr(cls, n, None), "__isabstractmethod__", False)
        )
        if missing:
            raise TypeError(f"backend {cls.__name__} does not implement: {', '.join(missing)}")

    @abstractmethod
    async def create(self, spec: Spec) -> State:
        """Prepare everything the workspace needs to run, without starting it.

        Called once, after the storage snapshots exist. Returns the initial
        state blob. Idempotent: calling it again on a half-made workspace
        (for example after the daemon died during create) completes it.
        """

    @abstractmethod
    async def start(self, spec: Spec, state: State) -> State:
        """Start the workspace's init; return when it can run exec.

        May be called on a stopped or never-started workspace. Idempotent:
        on a running workspace it does nothing; on a suspended one it resumes.
        """

    @abstractmethod
    async def stop(self, spec: Spec, state: State) -> State:
        """End every process of the workspace; keep its files and address.

        Idempotent: on a stopped or missing workspace it does nothing. A
        suspended workspace is thawed first so its processes can be killed.
        """

    @abstractmethod
    async def suspend(self, spec: Spec, state: State) -> State:
        """Freeze every process; memory is kept, CPU use drops to zero.

        Only for a running workspace. Idempotent on a suspended one.
        """

    @abstractmethod
    async def resume(self, spec: Spec, state: State) -> State:
        """Thaw a suspended workspace; the same processes continue.

        Idempotent on a running one. Must be fast: it is on the path of every
        connection to a suspended workspace.
        """

    @abstractmethod
    async def delete(self, spec: Spec, state: State) -> None:
        """Remove everything the backend made (processes, cgroups, network, mounts).

        Storage snapshots are the service's to remove, after this returns.
        Idempotent: anything already gone is skipped; may be called on a
        half-made workspace, in any state.
        """

    @abstractmethod
    async def update_resources(self, spec: Spec, state: State) -> State:
        """Apply the spec's cpu, memory and pids limits now and for every later start.

        May be called in any state; on a running or suspended workspace the
        new limits take effect at once. Idempotent.
        """

    @abstractmethod
    async def exec(self, spec: Spec, state: State, req: ExecRequest) -> ExecResult:
        """Run a command inside a running workspace and wait for it.

        The caller resumes a suspended workspace first. A timeout kills the
        command (not the workspace) and sets ``timed_out``. Output past
        ``req.max_output`` per stream is read and dropped (never held), and
        sets ``truncated``.
        """

    @abstractmethod
    async def exec_stream(
        self, spec: Spec, state: State, req: ExecRequest, *, tty: Terminal | None = None
    ) -> ExecStream:
        """Start a command inside a running workspace and return its streams at once.

        ``req.stdin``, ``timeout`` and ``max_output`` are not used: input is
        written and output read through the stream, and the caller ends it
        (:meth:`ExecStream.close`). The caller resumes a suspended workspace
        first and must close the stream whatever happens.

        ``tty`` None: pipes (stdout is channel 1, stderr 2). A :class:`Terminal`:
        the command runs on a new PTY of that size with ``TERM`` set; all its
        output comes on channel 1, what is written is the terminal's input, and
        :meth:`ExecStream.resize` changes its size. ``req.env`` is the whole
        environment besides what the backend must set (``PATH``/``HOME``
        defaults when missing); ``req.cwd`` empty means the user's home.
        Raises BackendFailure (with the reason) when it could not start.
        """

    @abstractmethod
    async def sftp(self, spec: Spec, state: State, user: str) -> ExecStream:
        """An SFTP server (protocol 3) on the stream's stdin/stdout, running inside
        as ``user`` (a name or uid in its /etc/passwd) in that user's home.

        Its view of files is the workspace's: no path leads out. Same duties for
        the caller as :meth:`exec_stream`.
        """

    @abstractmethod
    async def connect(self, spec: Spec, state: State, host: str, port: int) -> socket.socket:
        """A connected, non-blocking TCP stream socket to ``host:port`` as seen from
        inside the workspace (``127.0.0.1`` is its own loopback), under its
        firewall. ``host`` is an IP literal (the caller resolves names).

        Refused: ConnectionRefusedError; unreachable: another OSError; gives up
        after 10 seconds with TimeoutError. The caller owns the socket.
        """

    @abstractmethod
    async def status(self, spec: Spec, state: State) -> Status:
        """What is true on the host now: running, suspended, stopped, failed or missing.

        ``failed`` only where the backend can tell that the workspace ended without
        den asking and not by its own wish (the microvm backend: QEMU killed or
        crashed, the guest kernel panicked, the guest's init failed); the reconciler
        then cleans up after it (``stop``), marks it failed with :meth:`failure`'s
        reason, and ``start`` boots it again. A backend that cannot tell says
        ``stopped`` (the sandbox when its init ended: started again).
        Read-only and cheap; the reconciler calls it for every workspace.
        """

    async def failure(self, spec: Spec, state: State) -> str:
        """Why a workspace whose :meth:`status` is ``failed`` ended (one line, for
        people; read before ``stop`` cleans up). Backends that never say ``failed``
        keep this default."""
        return ""

    @abstractmethod
    async def stats(self, spec: Spec, state: State) -> Stats:
        """Resource use now (cumulative CPU, memory, pids, network bytes).

        Zeros for a workspace that is not running.
        """

    @abstractmethod
    async def orphans(self, known_ids: set[str]) -> list[str]:
        """Ids of workspaces this backend finds on the host but not in ``known_ids``.

        Used by the reconciler to remove what has no record.
        """

    @abstractmethod
    async def remove_orphan(self, ws_id: str) -> None:
        """Remove what the backend left on the host for a workspace with no record
        (processes, cgroups, network, mounts); calls ``on_down``. Idempotent."""

    @abstractmethod
    async def teardown_host(self) -> None:
        """Undo the instance-wide host changes of this backend once no workspace is
        left on any backend (the reconciler and den's purge call it). Idempotent.
        The shared :class:`HostContext` network is the caller's to tear down."""

    @abstractmethod
    def running(self, ws_id: str) -> bool:
        """Whether the workspace's processes exist now (running or suspended).

        Synchronous and cheap (no subprocess): called per request by den.meta.
        """

    # -- optional features: the default says the backend does not offer them --
    async def listen_tcp(
        self, spec: Spec, state: State, family: int, host: str, port: int, backlog: int = 128
    ) -> socket.socket:
        """A non-blocking TCP socket listening inside the workspace on ``host:port``
        (``family`` AF_INET or AF_INET6; an IP literal; port 0 picks one; ``::``
        takes IPv4 too) for ``ssh -R``: the daemon accepts on it. OSError when it
        cannot bind there."""
        raise unsupported(self.name, "remote forwarding (ssh -R)")

    async def unix_socket(
        self,
        spec: Spec,
        state: State,
        op: Literal["connect", "listen"],
        path: str,
        *,
        ids: str,
        cwd: str = "/",
        owner: str | None = None,
        replace: bool = False,
        make_parent: bool = False,
    ) -> socket.socket:
        """A non-blocking Unix stream socket at ``path`` inside the workspace,
        connected (``op`` "connect") or bound and listening ("listen"), made as
        ``ids`` ("UID:GID" inside) from ``cwd``; for a listener: ``owner``
        ("UID:GID") gets the socket file, ``replace`` removes a stale one,
        ``make_parent`` makes its directory. The host never resolves the path.
        BackendFailure (with the reason) when it fails."""
        raise unsupported(self.name, "Unix socket forwarding")

    def watch_stopped(
        self, spec: Spec, state: State, callback: Callable[[], None]
    ) -> Callable[[], None]:
        """Call ``callback`` once (on the event loop) when the workspace's processes
        end; returns a function that stops watching. Calls it soon when the
        workspace does not run now."""
        raise unsupported(self.name, "watching a workspace stop")
