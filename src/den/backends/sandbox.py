"""The sandbox backend: a crun container per workspace.

Namespaces (pid, mount, uts, ipc, net, cgroup, user) with root mapped to the
owner's subordinate id range; the rootfs and /code are idmapped views of the
workspace's btrfs snapshots (O(1), no chown walk); tini is PID 1; cgroup
limits from the workspace's resources; a netns with a veth on the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from den.backends import cgroups, netns, view
from den.backends.base import (
    PATH,
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
)
from den.backends.bundle import TINI, Views, config
from den.backends.crun import Crun, StreamedExec
from den.backends.inside import (  # noqa: F401  (re-exported: den's older imports)
    Account,
    NotReadable,
    account,
    load_account,
    read_inside,
    resolve_user,
)
from den.backends.inside import exists as exists_inside
from den.backends.seccomp import Filter
from den.backends.terminal import PtyExec
from den.errors import BackendFailure
from den.log import timed
from den.net import names
from den.net.network import RESOLV_CONF, Network, host_nameservers
from den.storage import idmap, mounts

log = logging.getLogger(__name__)
# crun and den's reaper get none of the daemon's environment.
SPAWN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
# OpenSSH's sftp-server where images keep it (den's own serves the others).
SFTP_SERVERS = (
    "usr/lib/openssh/sftp-server",
    "usr/lib/sftp-server",
    "usr/libexec/openssh/sftp-server",
)
SOCKET_WORKER_SECONDS = 15.0


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
        user, env, cwd = await self._exec_context(spec, req)
        pid_file = self._pid_file(spec.id)
        if tty is not None:
            return await PtyExec.start(
                self.crun,
                self.cid(spec.id),
                req.argv,
                env=env,
                cwd=cwd,
                user=user,
                pid_file=pid_file,
                sock_dir=Path(f"/run/den/ssh{self.instance}"),
                spawn_env=SPAWN_ENV,
                tty=tty,
            )
        argv = self.crun.exec_argv(
            self.cid(spec.id), req.argv, env=env, cwd=cwd, user=user, pid_file=pid_file, detach=True
        )
        return await StreamedExec.start(argv, pid_file, SPAWN_ENV)

    def _pid_file(self, ws_id: str) -> Path:
        """A fresh name for the pid file of one streamed process, in the bundle."""
        pid_dir = self.bundle(ws_id)
        pid_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return pid_dir / f"stream-{secrets.token_hex(6)}.pid"

    def _init(self, ws_id: str) -> tuple[int, int]:
        """(pid, start time) of the workspace's init, for the workers that join it."""
        init = self.crun.init_process(self.cid(ws_id))
        if init is None:
            raise BackendFailure("the workspace has no running init")
        return init

    async def sftp(self, spec: Spec, state: State, user: str) -> ExecStream:
        """OpenSSH's sftp-server when the image has one (through crun exec); otherwise
        den's own (den.ssh.sftp_server) in a worker that joins the workspace's cgroup
        and namespaces (den.ssh.sftp_worker)."""
        acct = await load_account(spec.rootfs, user)
        pid_file = self._pid_file(spec.id)
        for rel in SFTP_SERVERS:
            if exists_inside(spec.rootfs, rel):
                env = {"PATH": PATH, "HOME": acct.home, "USER": acct.name, "LOGNAME": acct.name}
                argv = self.crun.exec_argv(
                    self.cid(spec.id),
                    [f"/{rel}"],
                    env=env,
                    cwd=acct.home,
                    user=acct.ids,
                    pid_file=pid_file,
                    detach=True,
                )
                return await StreamedExec.start(argv, pid_file, SPAWN_ENV)
        pid, started = self._init(spec.id)
        argv = [
            sys.executable,
            "-I",
            "-m",
            "den.ssh.sftp_worker",
            "--pid",
            str(pid),
            "--start-time",
            str(started),
            "--user",
            acct.ids,
            "--home",
            acct.home,
            "--cgroup",
            self.cgroup(spec.id),
            "--bundle",
            str(self.bundle(spec.id)),
        ]
        return await StreamedExec.start(argv, pid_file, SPAWN_ENV, reaped=False)

    async def _socket(self, ws_id: str, family: int) -> socket.socket:
        loop = asyncio.get_running_loop()
        path = self.network.netns_path(ws_id)
        sock = await loop.run_in_executor(netns.netns_thread, netns.socket_in, path, family)
        sock.setblocking(False)
        return sock

    async def connect(self, spec: Spec, state: State, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = await self._socket(spec.id, family)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 10)
        except BaseException:
            sock.close()
            raise
        return sock

    async def listen_tcp(
        self, spec: Spec, state: State, family: int, host: str, port: int, backlog: int = 128
    ) -> socket.socket:
        sock = await self._socket(spec.id, family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "::":
                # One socket for both families when all addresses were asked for.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

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
        """Made inside by den.ssh.socket_worker (joined to the workspace) and its fd
        handed back: the host never resolves a path the workspace controls."""
        from den.ssh import join

        argv = join.argv(
            "den.ssh.socket_worker",
            self._init(spec.id),
            ids,
            self.cgroup(spec.id),
            self.bundle(spec.id),
        )
        # As --opt=value: a home inside starting with "-" is no option (argparse).
        opts = [f"--cwd={cwd}"]
        if owner:
            opts.append(f"--owner={owner}")
        if replace:
            opts.append("--replace")
        if make_parent:
            opts.append("--make-parent")
        argv += [*opts, op, "--", path]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with ours:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=theirs.fileno(),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    env=SPAWN_ENV,
                )
            finally:
                theirs.close()
            try:
                _, err = await asyncio.wait_for(proc.communicate(), SOCKET_WORKER_SECONDS)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise BackendFailure(f"the workspace did not {op} {path} in time") from None
            ours.setblocking(False)
            try:
                msg, fds, _flags, _addr = socket.recv_fds(ours, 1024, 1)
            except BlockingIOError:
                msg, fds = b"", []
        if msg == b"ok" and len(fds) == 1:
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            return sock
        for fd in fds:
            os.close(fd)
        why = msg.decode(errors="replace") or err.decode(errors="replace").strip()[-300:]
        raise BackendFailure(why or f"the socket worker failed ({proc.returncode})")

    def watch_stopped(
        self, spec: Spec, state: State, callback: Callable[[], None]
    ) -> Callable[[], None]:
        """Through the pidfd of the workspace's init, which turns readable when it ends."""
        loop = asyncio.get_running_loop()
        cid = self.cid(spec.id)
        found = self.crun.init_process(cid)
        fd = -1
        if found is not None:
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(found[0])
            if fd >= 0 and self.crun.init_process(cid) != found:  # the pid was reused
                os.close(fd)
                fd = -1
        if fd < 0:
            handle = loop.call_soon(callback)
            return handle.cancel

        def fired() -> None:
            cancel()
            callback()

        def cancel() -> None:
            nonlocal fd
            if fd >= 0:
                loop.remove_reader(fd)
                os.close(fd)
                fd = -1

        loop.add_reader(fd, fired)
        return cancel

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
        """Undo the sandbox's own host changes once the instance has no workspace left
        (the shared network is the caller's: den.app.App.teardown_host)."""

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
