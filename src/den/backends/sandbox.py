"""The sandbox backend: a crun container per workspace.

Namespaces (pid, mount, uts, ipc, net, cgroup, user) with root mapped to the
owner's subordinate id range; the rootfs and /code are idmapped views of the
workspace's btrfs snapshots (O(1), no chown walk); tini is PID 1; cgroup
limits from the workspace's resources; a netns with a veth on the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from den.backends import cgroups, view
from den.backends.base import (
    Backend,
    ExecRequest,
    ExecResult,
    ExecStream,
    HostContext,
    Spec,
    State,
    Stats,
    Status,
    Terminal,
    unsupported,
)
from den.backends.bundle import TINI, Views, config
from den.backends.crun import Crun, StreamedExec
from den.backends.seccomp import Filter
from den.errors import BackendFailure, Conflict, InvalidParams
from den.log import timed
from den.net import names
from den.net.network import RESOLV_CONF, Network, host_nameservers
from den.storage import idmap, mounts

log = logging.getLogger(__name__)
# crun and den's reaper get none of the daemon's environment.
SPAWN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class SandboxBackend(Backend):
    name = "sandbox"

    def __init__(self, host: HostContext) -> None:
        super().__init__(host)
        instance = self.instance = host.instance
        # The OCI linux.seccomp of every workspace (den.backends.seccomp).
        self.seccomp: Filter | None = host.seccomp
        self.prefix = f"den{instance}-"
        self.cgroup_parent = f"/den{instance}"
        self.bundles = host.data_dir / "bundles"
        self.volumes = host.volumes
        self.views_dir = host.volumes.parent / "views"
        self._init_ready = False
        self.network: Network = host.network
        self.crun = Crun(Path(f"/run/den/crun{instance}"))

    # -- names and paths -------------------------------------------------------
    def cid(self, ws_id: str) -> str:
        return self.prefix + ws_id

    def cgroup(self, ws_id: str) -> str:
        return f"{self.cgroup_parent}/{ws_id}"

    def bundle(self, ws_id: str) -> Path:
        return self.bundles / ws_id

    def views(self, ws_id: str) -> Views:
        # Raw snapshots stay in the root-only volumes directory: their files are
        # owned by uid 0 on disk. The workspace's root (a host uid of its own)
        # reaches only these mounts, in a directory only it (and host root)
        # may enter: host users cannot run its setuid files or read its files
        # through the idmapped views.
        vdir = self.views_dir / ws_id
        return Views(
            root=vdir / "root",
            code=vdir / "code",
            sys=vdir / "sys",
            etc=vdir / "etc",
            init=self.views_dir / ".init" / view.INIT_NAME,
        )

    # -- pieces ----------------------------------------------------------------
    def _mount_views(self, spec: Spec) -> None:
        v = self.views(spec.id)
        vdir = v.root.parent
        fresh = not vdir.exists()
        self.views_dir.mkdir(exist_ok=True, mode=0o711)
        self.views_dir.chmod(0o711)
        vdir.mkdir(exist_ok=True, mode=0o700)
        os.chown(vdir, spec.uid_start, spec.uid_start)
        vdir.chmod(0o700)
        if not (self._init_ready and v.init.exists()):  # shared by the instance's workspaces
            view.ensure_init(v.init.parent, TINI)
            self._init_ready = True
        # One read of mountinfo, none for a fresh workspace: it grows with each one.
        mounted = set() if fresh else mounts.mount_points()
        views = ((spec.rootfs, v.root, shifted(spec)), (spec.code, v.code, code_ids(spec)))
        for raw, target, ids in views:
            target.mkdir(exist_ok=True)
            if os.path.realpath(target) not in mounted:
                idmap.idmapped_bind(raw, target, ids)
        view.mount_sysfs(v.sys, names.netns(self.instance, spec.id), mounted)
        view.write_etc(v.etc, self._etc_files(spec), mounted)

    def _unmount_views(self, ws_id: str) -> None:
        v = self.views(ws_id)
        mounted = mounts.mount_points()
        for target in (v.root, v.code, v.sys, v.etc):
            view.unmount(target, mounted)
            with contextlib.suppress(OSError):
                target.rmdir()
        with contextlib.suppress(OSError):
            v.root.parent.rmdir()

    def _etc_files(self, spec: Spec) -> dict[str, str]:
        # Served from a tmpfs of den's and bind-mounted over the rootfs by
        # crun, never written into the rootfs: its /etc is the workspace's to
        # replace, with symlinks that would lead a host-side write anywhere.
        return {
            "hostname": spec.hostname + "\n",
            "hosts": (
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                f"{spec.address}\t{spec.hostname}\n"
            ),
            "resolv.conf": host_resolvers(),
        }

    def _write_bundle(self, spec: Spec) -> None:
        b = self.bundle(spec.id)
        b.mkdir(parents=True, exist_ok=True, mode=0o711)
        cfg = config(
            spec,
            self.views(spec.id),
            self.network.netns_path(spec.id),
            self.cgroup(spec.id),
            self.seccomp,
        )
        tmp = b / "config.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=1))
        tmp.replace(b / "config.json")

    # -- the contract ------------------------------------------------------------
    async def create(self, spec: Spec) -> State:
        with timed("network", ws=spec.id):
            await self.network.ensure()
            await self.network.attach(spec.id, spec.address)
        with timed("views and bundle", ws=spec.id):
            await asyncio.to_thread(self._prepare, spec)
        # "prepared": start may skip checking the pieces create just made.
        return {"container": self.cid(spec.id), "cgroup": self.cgroup(spec.id), "prepared": True}

    def _prepare(self, spec: Spec) -> None:
        self._mount_views(spec)
        self._write_bundle(spec)

    async def start(self, spec: Spec, state: State) -> State:
        cid = self.cid(spec.id)
        st = self.crun.quick_state(cid)
        if st == "running":
            if cgroups.is_frozen(self.cgroup(spec.id)):
                await self.resume(spec, state)
            for up in self.on_up:
                await up(spec.id)
            return state
        if st is not None:
            await self.crun.delete(cid)
        if not state.get("prepared"):
            # After a reboot or a half-made create, the pieces may be missing.
            if not await asyncio.to_thread(self.network.present, spec.id):
                await self.network.ensure()
                await self.network.attach(spec.id, spec.address)
            await asyncio.to_thread(self._prepare, spec)
        state = {k: v for k, v in state.items() if k != "prepared"}
        # The hooks (the metadata service's listener) run while crun starts the
        # workspace, not before it: they cost a thread in its namespace each, and
        # start returns once both are done.
        ups = asyncio.ensure_future(asyncio.gather(*(up(spec.id) for up in self.on_up)))
        try:
            with timed("crun run", ws=spec.id):
                await self.crun.run(cid, self.bundle(spec.id))
            await self._check_init(spec)
        finally:
            await ups
        return state

    async def _check_init(self, spec: Spec, timeout: float = 5.0) -> None:
        """Fail now, not at the first exec, when init cannot start its child.

        Healthy means: init's child runs `sleep` (a fork of tini that has not
        exec'd yet, or crun still setting up, does not count).
        """
        cg, cid = self.cgroup(spec.id), self.cid(spec.id)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(_comm(pid) == "sleep" for pid in cgroups.procs(cg)):
                return
            if self.crun.quick_state(cid) != "running":
                break
            await asyncio.sleep(0.0005)
        await self.crun.kill(cid, "KILL", all_processes=True)
        await self.crun.delete(cid)
        raise BackendFailure(
            "the workspace's init could not start: the image needs a `sleep` that accepts "
            "`infinity` (coreutils or busybox) on its PATH"
        )

    async def stop(self, spec: Spec, state: State) -> State:
        for down in self.on_down:
            await down(spec.id)
        cid = self.cid(spec.id)
        st = self.crun.quick_state(cid)
        if st is None:
            return state
        if cgroups.is_frozen(self.cgroup(spec.id)):
            await asyncio.to_thread(cgroups.thaw, self.cgroup(spec.id))
        if st == "running":
            await self.crun.kill(cid, "TERM")
            for _ in range(100):  # tini forwards TERM; give the processes 2 s
                if self.crun.quick_state(cid) != "running":
                    break
                await asyncio.sleep(0.02)
            else:
                await self.crun.kill(cid, "KILL", all_processes=True)
        await self.crun.delete(cid)
        return {k: v for k, v in state.items() if k != "prepared"}

    async def suspend(self, spec: Spec, state: State) -> State:
        await asyncio.to_thread(cgroups.freeze, self.cgroup(spec.id))
        return state

    async def resume(self, spec: Spec, state: State) -> State:
        cgroups.thaw(self.cgroup(spec.id))  # a file write: cheaper than a thread hop
        return state

    async def delete(self, spec: Spec, state: State) -> None:
        await self.stop(spec, state)
        await self.crun.delete(self.cid(spec.id))
        await asyncio.to_thread(self._remove_host_parts, spec.id)
        await self.network.detach(spec.id)

    def _remove_host_parts(self, ws_id: str) -> None:
        self._unmount_views(ws_id)
        shutil.rmtree(self.bundle(ws_id), ignore_errors=True)
        cgroups.remove(self.cgroup(ws_id))

    async def update_resources(self, spec: Spec, state: State) -> State:
        await asyncio.to_thread(self._write_bundle, spec)
        cid = self.cid(spec.id)
        if self.crun.quick_state(cid) == "running":
            period = 100_000
            await self.crun.update(
                cid, int(spec.cpu * period), period, spec.memory_mb << 20, spec.pids
            )
        return state

    async def _exec_context(self, spec: Spec, req: ExecRequest) -> tuple[str, dict[str, str], str]:
        """(uid:gid, environment, working directory) of an exec."""
        user, home = await resolve_user(spec.rootfs, req.user)
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": home,
            "LANG": "C.UTF-8",
            **req.env,
        }
        return user, env, req.cwd or home

    async def exec(self, spec: Spec, state: State, req: ExecRequest) -> ExecResult:
        user, env, cwd = await self._exec_context(spec, req)
        with timed("crun exec", ws=spec.id):
            out = await self.crun.exec(
                self.cid(spec.id),
                req.argv,
                env=env,
                cwd=cwd,
                user=user,
                stdin=req.stdin,
                timeout=req.timeout,
                pid_dir=self.bundle(spec.id),
                max_output=req.max_output,
            )
        return ExecResult(out.exit_code, out.stdout, out.stderr, out.timed_out, out.truncated)

    async def exec_stream(
        self, spec: Spec, state: State, req: ExecRequest, *, tty: Terminal | None = None
    ) -> ExecStream:
        if tty is not None:
            raise unsupported(self.name, "a terminal through the contract yet")
        user, env, cwd = await self._exec_context(spec, req)
        pid_dir = self.bundle(spec.id)
        pid_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pid_file = pid_dir / f"stream-{secrets.token_hex(6)}.pid"
        argv = self.crun.exec_argv(
            self.cid(spec.id), req.argv, env=env, cwd=cwd, user=user, pid_file=pid_file, detach=True
        )
        return await StreamedExec.start(argv, pid_file, SPAWN_ENV)

    async def sftp(self, spec: Spec, state: State, user: str) -> ExecStream:
        raise unsupported(self.name, "sftp through the contract yet")

    async def connect(self, spec: Spec, state: State, host: str, port: int) -> socket.socket:
        raise unsupported(self.name, "connect through the contract yet")

    def running(self, ws_id: str) -> bool:
        return self.crun.quick_state(self.cid(ws_id)) == "running"

    async def status(self, spec: Spec, state: State) -> Status:
        st = self.crun.quick_state(self.cid(spec.id))
        if st is None:
            return "stopped" if self.bundle(spec.id).exists() else "missing"
        if st == "running":
            return "suspended" if cgroups.is_frozen(self.cgroup(spec.id)) else "running"
        return "stopped"

    async def stats(self, spec: Spec, state: State) -> Stats:
        cg = self.cgroup(spec.id)
        rx, tx = self.network.counters(spec.id)  # sysfs files, no netlink
        return Stats(
            cpu_seconds=cgroups.cpu_seconds(cg),
            memory_bytes=cgroups.memory_bytes(cg),
            pids=cgroups.pids(cg),
            net_rx_bytes=rx,
            net_tx_bytes=tx,
        )

    async def orphans(self, known_ids: set[str]) -> list[str]:
        found = {c[len(self.prefix) :] for c in self.crun.ids(self.prefix)}
        if self.bundles.exists():
            found.update(p.name for p in self.bundles.iterdir() if p.is_dir())
        found.update(cgroups.children(self.cgroup_parent))
        if self.views_dir.exists():
            found.update(
                p.name for p in self.views_dir.iterdir() if p.is_dir() and p.name != ".init"
            )
        return sorted(found - known_ids)

    async def teardown_host(self) -> None:
        """Undo the instance's host changes once it has no workspace left."""
        await self.network.teardown()

        def empty_dirs() -> None:
            cgroups.remove(self.cgroup_parent)
            init_dir = self.views(".").init.parent
            self._init_ready = False
            view.unmount(init_dir)
            with contextlib.suppress(OSError):
                init_dir.rmdir()
            for d in (self.crun.root, self.views_dir):
                with contextlib.suppress(OSError):
                    d.rmdir()

        await asyncio.to_thread(empty_dirs)

    async def remove_orphan(self, ws_id: str) -> None:
        """Remove what the backend left on the host for a workspace with no record."""
        cid = self.cid(ws_id)
        if self.crun.quick_state(cid) is not None:
            if cgroups.is_frozen(self.cgroup(ws_id)):
                cgroups.thaw(self.cgroup(ws_id))
            await self.crun.kill(cid, "KILL", all_processes=True)
            await self.crun.delete(cid)
        await asyncio.to_thread(self._remove_host_parts, ws_id)
        for down in self.on_down:
            await down(ws_id)
        await self.network.detach(ws_id)


def shifted(spec: Spec) -> idmap.Extents:
    """The workspace's ids: on-disk 0.. are its 0.. inside."""
    return idmap.shifted(spec.uid_start, spec.uid_count)


def code_ids(spec: Spec) -> idmap.Extents:
    """The ids of its /code view: on-disk root is ``spec.code_owner`` inside (and
    that id root), so that the tree den cloned as root is the owner's account's
    and what it writes is root's on disk, as the host's tree is. No chown walk:
    the map is one more cached user namespace per owner."""
    if spec.code_owner:
        return idmap.swapped(spec.uid_start, spec.uid_count, spec.code_owner)
    return shifted(spec)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def host_resolvers() -> str:
    """The workspace's resolv.conf: the host's nameservers (not loopback ones) with
    its search and options lines."""
    lines = [f"nameserver {a}" for a in host_nameservers()]
    try:
        for line in RESOLV_CONF.read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in ("search", "options"):
                lines.append(line)
    except OSError:
        pass
    if not lines:
        return "# den: the host has no resolver a workspace can use\n"
    return "\n".join(lines) + "\n"


# A workspace controls every byte of its rootfs: den reads from it only small
# regular files, through descriptors that follow no symlink and never wait.
READ_LIMIT = 1 << 20
READ_TIMEOUT = 5.0


class NotReadable(Exception):
    """A workspace file den will not read (not a regular file, or too large)."""


def read_inside(rootfs: Path, *parts: str, limit: int = READ_LIMIT) -> str:
    """Read a small regular file of a workspace's rootfs without following any symlink.

    The workspace owns its rootfs: a symlink there must not make den (root on
    the host) read a host file, and a FIFO or device must not make it wait
    (the open is O_PATH, then the same inode is reopened non-blocking only once
    fstat says it is a regular file). Raises OSError when a part is missing or
    a symlink, :class:`NotReadable` for anything else den will not read.
    """
    flags = os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(rootfs, flags | os.O_PATH | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            # O_DIRECTORY: a FIFO or device on the way fails with ENOTDIR, unopened.
            nxt = os.open(part, flags | os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        path_fd = os.open(parts[-1], flags | os.O_PATH, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        st = os.fstat(path_fd)
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "a symlink", "/".join(parts))
        if not stat.S_ISREG(st.st_mode):
            raise NotReadable(f"/{'/'.join(parts)} is not a regular file")
        if st.st_size > limit:
            raise NotReadable(f"/{'/'.join(parts)} is larger than {limit >> 10} KiB")
        # Reopening through the O_PATH descriptor opens that very inode, whatever
        # the workspace renames meanwhile; O_NONBLOCK so that nothing can wait.
        file_fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(path_fd)
    with os.fdopen(file_fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotReadable(f"/{'/'.join(parts)} is not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise NotReadable(f"/{'/'.join(parts)} is larger than {limit >> 10} KiB")
    return data.decode(errors="replace")


@dataclass(frozen=True)
class Account:
    """A user inside a workspace, from its /etc/passwd."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @property
    def ids(self) -> str:
        return f"{self.uid}:{self.gid}"


def _passwd_lines(rootfs: Path) -> list[str]:
    try:
        return read_inside(rootfs, "etc", "passwd").splitlines()
    except NotReadable as exc:
        raise Conflict(f"den cannot use the workspace's /etc/passwd: {exc}") from None
    except OSError:
        return []  # missing (or a symlink): only root, with its defaults


_ID = re.compile(r"[0-9]{1,10}")  # ASCII digits only: str.isdigit() takes "²"


def _find(lines: list[str], user: str) -> Account:
    for line in lines:
        f = line.split(":")
        if len(f) >= 6 and user in (f[0], f[2]) and _ID.fullmatch(f[2]) and _ID.fullmatch(f[3]):
            shell = f[6] if len(f) >= 7 and f[6] else "/bin/sh"
            return Account(f[0], int(f[2]), int(f[3]), f[5] or "/", shell)
    if user in ("", "root", "0"):
        return Account("root", 0, 0, "/root", "/bin/sh")
    raise InvalidParams(f"no user {user!r} in the workspace's /etc/passwd", field="user")


def account(rootfs: Path, user: str) -> Account:
    """The workspace's /etc/passwd entry of ``user`` (by name or uid; root needs none).

    Never waits on the workspace (see :func:`read_inside`); prefer
    :func:`load_account`, which also keeps the disk read off the event loop.
    """
    return _find(_passwd_lines(rootfs), user)


async def load_account(rootfs: Path, user: str, timeout: float = READ_TIMEOUT) -> Account:
    """:func:`account` in a thread, given up after ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(account, rootfs, user), timeout)
    except TimeoutError:
        raise Conflict(
            f"the workspace's /etc/passwd took longer than {timeout:g} s to read"
        ) from None


async def resolve_user(rootfs: Path, user: str) -> tuple[str, str]:
    """("uid:gid", home) for exec: a passwd entry, or a bare numeric uid."""
    if user in ("", "root", "0"):
        return "0:0", "/root"
    if user.isdigit():
        try:
            acct = await load_account(rootfs, user)
        except InvalidParams:
            return f"{user}:{user}", "/"
        return acct.ids, acct.home
    acct = await load_account(rootfs, user)
    return acct.ids, acct.home
