"""The microvm backend: one QEMU ``-M microvm`` guest per workspace.

The guest boots den's kernel and initramfs (assets.py); its root filesystem and
/code are the workspace's btrfs snapshots served by virtiofsd (O(1), the same
snapshots the sandbox uses, ids unshifted on disk); its eth0 is a TAP on den's
bridge under the same nftables rules plus anti-spoofing (den.net.tap); den's
agent, PID 1 in the guest, runs commands, terminals and TCP relays over a
virtio-serial port (channel.py).

Host layout of a workspace: ``DATA_DIR/vms/<id>/`` (root-only) with
``qemu.pid``, ``qmp.sock``, ``agent.sock``, ``root.sock``/``code.sock``
(virtiofsd), ``console.sock`` (the serial port, which den reads into a bounded
``console.log``: console.py) and the logs of the processes' start; the TAP
``t<N>-<id>``; the cgroup ``/den<N>/<id>`` holding QEMU and both virtiofsd.
Everything is found again from these after a ``kill -9`` of the daemon.

How a VM ended (:meth:`MicroVMBackend.status`): den records QEMU's pid and the
host's boot id in the state blob when it boots a VM and drops the pid when it
stops it. A VM whose QEMU is gone while the state still has its pid ended without
den: ``failed`` if QEMU was killed or crashed, the guest kernel panicked or den's
init failed (the reason from the console's last lines, :meth:`failure`);
``stopped`` if the guest powered itself off (a ``poweroff -f`` typed inside: its
own wish, like a sandbox whose init ended; the reconciler starts it again) or if
the host restarted since (another boot id: started again like a sandbox).

QEMU runs unprivileged: as the workspace's own host uid (``spec.uid_start``, the
id root inside a sandbox workspace of the owner has; nothing else on the host
runs as it), no supplementary groups but ``kvm``'s under KVM, no capabilities, no
new privileges, through util-linux ``setpriv`` (QEMU 7.2's ``-runas`` takes
only a user name). It owns its TAP and the VM directory (its sockets, console,
pid file), where den hard-links the kernel and initramfs for it; den reads what
it writes there without following links or blocking on FIFOs. virtiofsd stays
root (it serves files of every owner) in its own sandbox.

Memory limit of the cgroup: guest memory + :data:`OVERHEAD_MB`. Measured
here for an idle busybox guest of 256 MiB under TCG: QEMU resident 228 MB, of
which 126 MB is guest RAM the guest touched (shared memfd), 88 MB QEMU's own
heap with TCG's translation cache (capped at 64 MiB by ``tb-size``) and 14 MB
mapped files; both virtiofsd together 14 MB; the cgroup 216 MiB. So about
120 MiB above guest RAM under TCG: 256 MiB leaves room for the cache and I/O
buffers. Under KVM there is no translation cache: 128 MiB (not measured here,
this host has no usable KVM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import socket
import time
from pathlib import Path

from den import tasks
from den.backends import cgroups
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
from den.backends.inside import exists as exists_inside
from den.backends.inside import load_account, resolve_user
from den.backends.microvm import assets as vm_assets
from den.backends.microvm import console as vm_console
from den.backends.microvm import qemu
from den.backends.microvm.channel import AgentChannel, AgentGone
from den.errors import BackendFailure, InvalidParams
from den.log import timed
from den.net import links, names, tap
from den.net.network import host_resolvers4

log = logging.getLogger(__name__)
OVERHEAD_MB = {"tcg": 256, "kvm": 128}
# The cgroup holds QEMU's and virtiofsd's threads, not the guest's processes (its
# own kernel counts those): the workspace's pids limit there would starve
# virtiofsd's thread pool and hang the guest's I/O. A fixed cap still stops a
# runaway QEMU. The guest's process count is not limited by den.
HOST_PIDS = 1024
BOOT_TIMEOUT = {"tcg": 90.0, "kvm": 20.0}
POWEROFF_SECONDS = 8.0  # the agent's TERM, 2 s, KILL, sync, then the guest powers off
QUIT_SECONDS = 3.0
SFTP_SERVERS = (
    "usr/lib/openssh/sftp-server",
    "usr/lib/sftp-server",
    "usr/libexec/openssh/sftp-server",
)
_HOSTNAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # den's names (services.common.NAME_RE) fit
# QMP run states: paused by den (stop) is suspended; "shutdown" is the guest
# powering off (QEMU exits right after: -no-reboot); the others are failures.
_ENDED = {"shutdown", "internal-error", "guest-panicked", "io-error", "watchdog"}
_FAILED_RUN = _ENDED - {"shutdown"}
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
SETPRIV = "/usr/bin/setpriv"
# The kernel's own lines on the console (pr_emerg: printed under `quiet` too).
_PANIC = "Kernel panic"
_POWER_DOWN = "reboot: Power down"
_INIT_FAILED = "den-init: failed"


class MicroVMBackend(Backend):
    name = "microvm"

    def __init__(self, host: HostContext) -> None:
        super().__init__(host)
        self.instance = host.instance
        self.network = host.network
        self.vms = host.data_dir / "vms"
        self.cgroup_parent = f"/den{host.instance}"
        self._agents: dict[str, AgentChannel] = {}
        self._agent_locks: dict[str, asyncio.Lock] = {}
        self._monitors: dict[str, qemu.Monitor] = {}
        self._consoles: dict[str, tuple[vm_console.Console, asyncio.Task[None]]] = {}

    # -- names ---------------------------------------------------------------------------
    def vmdir(self, ws_id: str) -> Path:
        return self.vms / ws_id

    def cgroup(self, ws_id: str) -> str:
        return f"{self.cgroup_parent}/{ws_id}"

    def tap(self, ws_id: str) -> str:
        return names.tap(self.instance, ws_id)

    def monitor(self, ws_id: str) -> qemu.Monitor:
        mon = self._monitors.get(ws_id)
        if mon is None:
            mon = self._monitors[ws_id] = qemu.Monitor(self.vmdir(ws_id) / "qmp.sock")
        return mon

    def _pid(self, ws_id: str, state: State) -> tuple[int | None, int | None]:
        """QEMU's (pid, start time) if it runs: from the state, else from its pid file
        (a start the daemon died in the middle of)."""
        pid, start = state.get("pid"), state.get("pid_start")
        if isinstance(pid, int) and isinstance(start, int) and qemu.alive(pid, start):
            return pid, start
        found = _read_pid(self.vmdir(ws_id) / "qemu.pid")
        if found is not None and self._is_ours(ws_id, found):
            return found, qemu.proc_start(found)
        return None, None

    def _is_ours(self, ws_id: str, pid: int) -> bool:
        """``pid`` is the QEMU of this VM: a QEMU whose command line names the VM
        directory, in the VM's cgroup (the pid file is written by QEMU, which runs
        as the workspace's uid: it alone proves nothing)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            return False
        return (
            cmd.split(b"\0", 1)[0].endswith(vm_assets.QEMU.encode())
            and str(self.vmdir(ws_id)).encode() + b"/" in cmd
            and qemu.proc_start(pid) is not None
            and pid in cgroups.procs(self.cgroup(ws_id))
        )

    # -- the contract --------------------------------------------------------------------
    async def create(self, spec: Spec) -> State:
        assets = vm_assets.assets_ready(self.host.data_dir)
        if assets is None:
            raise BackendFailure(
                "the microVM guest kernel and initramfs are not built: run `den init`"
            )
        accel = await vm_assets.probe_accel(self.host.data_dir)
        _check_hostname(spec.hostname)
        vmdir = self.vmdir(spec.id)
        # The directory first: whatever a killed daemon leaves after it is found by it.
        self._make_vmdir(spec)
        mac = links.workspace_mac(spec.address)
        with timed("tap", ws=spec.id):
            await self._attach(spec, mac)
        await asyncio.to_thread(
            qemu.make_cgroup,
            self.cgroup(spec.id),
            self._mem_limit(spec, accel.name),
            spec.cpu,
            HOST_PIDS,
        )
        return {
            "vmdir": str(vmdir),
            "accel": accel.name,
            "tap": self.tap(spec.id),
            "mac": mac,
        }

    def _make_vmdir(self, spec: Spec) -> None:
        """The VM directory, QEMU's: owned by the workspace's uid, in a directory
        only root lists (others may only pass through to their own)."""
        self.vms.mkdir(parents=True, exist_ok=True, mode=0o711)
        self.vms.chmod(0o711)
        d = self.vmdir(spec.id)
        d.mkdir(exist_ok=True, mode=0o700)
        os.chown(d, spec.uid_start, spec.uid_start)

    async def _attach(self, spec: Spec, mac: str) -> None:
        await self.network.ensure()
        await asyncio.to_thread(
            tap.attach,
            self.instance,
            self.tap(spec.id),
            self.network.bridge,
            mac,
            spec.address,
            spec.uid_start,
        )
        await self.network.refresh_exceptions()

    def _mem_limit(self, spec: Spec, accel: str) -> int:
        return (spec.memory_mb + OVERHEAD_MB.get(accel, 256)) << 20

    def _cpus(self, spec: Spec) -> int:
        return max(1, math.ceil(spec.cpu)) if spec.cpu > 0 else 1

    def _cmdline(self, spec: Spec, mac: str) -> str:
        _check_hostname(spec.hostname)
        gw = self.network.gateway
        parts = [
            vm_assets.base_cmdline(),
            "reboot=t",  # a panic (panic=-1) reboots: with -no-reboot QEMU exits
            f"den.ip={spec.address}/{self.network.prefixlen}",
            f"den.gw={gw.ip}",
            f"den.hostname={spec.hostname}",
            f"den.mac={mac}",
            "den.code=1",
        ]
        dns = host_resolvers4()
        if dns:
            parts.append("den.dns=" + ",".join(dns))
        return " ".join(parts)

    def _argv(self, spec: Spec, state: State, assets: vm_assets.Assets) -> list[str]:
        d = self.vmdir(spec.id)
        accel = state.get("accel", "tcg")
        mem = spec.memory_mb
        return [
            *self._unprivileged(spec, accel),
            vm_assets.QEMU,
            "-name", f"den-{spec.id}",
            "-M", "microvm,memory-backend=mem",
            # TCG's translation cache defaults to 1 GiB: capped, it bounds QEMU's overhead.
            "-accel", "tcg,tb-size=64" if accel == "tcg" else "kvm",
            "-cpu", vm_assets.CPU.get(accel, "max"),
            "-smp", str(self._cpus(spec)),
            "-m", str(mem),
            "-object", f"memory-backend-memfd,id=mem,size={mem}M,share=on",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            # The serial port on a socket den reads (console.py), never a file QEMU
            # appends to: the guest writes it at will. Unread (den down), QEMU drops it.
            "-chardev", f"socket,id=con,path={d / 'console.sock'},server=on,wait=off",
            "-serial", "chardev:con",
            # den's links to the assets (their directory is root's alone)
            "-kernel", str(d / "vmlinuz"), "-initrd", str(d / "initrd.img"),
            "-append", self._cmdline(spec, state["mac"]),
            "-global", "virtio-mmio.force-legacy=false",
            "-chardev", f"socket,id=fs0,path={d / 'root.sock'}",
            "-device", "vhost-user-fs-device,chardev=fs0,tag=root",
            "-chardev", f"socket,id=fs1,path={d / 'code.sock'}",
            "-device", "vhost-user-fs-device,chardev=fs1,tag=code",
            "-netdev", f"tap,id=n0,ifname={state['tap']},script=no,downscript=no",
            "-device", f"virtio-net-device,netdev=n0,mac={state['mac']}",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=ag,path={d / 'agent.sock'},server=on,wait=off",
            "-device", "virtserialport,chardev=ag,name=den.agent",
            "-chardev", f"socket,id=qmp,path={d / 'qmp.sock'},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            # QEMU's own seccomp filter: it emulates an untrusted guest.
            # (elevateprivileges= and spawn=deny refuse -daemonize's setsid/fork
            # in QEMU 7.2: measured, exit 1 / SIGSYS.)
            "-sandbox", "on,obsolete=deny,resourcecontrol=deny",
            "-daemonize", "-pidfile", str(d / "qemu.pid"),
        ]  # fmt: skip

    def _unprivileged(self, spec: Spec, accel: str) -> list[str]:
        """setpriv's argv: QEMU as the workspace's uid, no groups but /dev/kvm's
        under KVM, no capabilities (not even inheritable or in the bounding set)."""
        ids = [f"--reuid={spec.uid_start}", f"--regid={spec.uid_start}"]
        groups = ["--clear-groups"]
        if accel == "kvm":
            with contextlib.suppress(OSError):
                groups = [f"--groups={os.stat('/dev/kvm').st_gid}"]
        return [
            SETPRIV, *ids, *groups, "--inh-caps=-all", "--bounding-set=-all",
            "--no-new-privs", "--",
        ]  # fmt: skip

    def _link_assets(self, spec: Spec, assets: vm_assets.Assets) -> None:
        """The kernel and initramfs in the VM directory, readable by QEMU's uid:
        hard links (same file system, no copy), else copies."""
        d = self.vmdir(spec.id)
        for src, name in ((assets.kernel, "vmlinuz"), (assets.initrd, "initrd.img")):
            dst = d / name
            dst.unlink(missing_ok=True)
            try:
                os.link(src, dst)
                if os.stat(dst).st_mode & 0o004:
                    continue
                dst.unlink()
            except OSError:
                pass
            shutil.copyfile(src, dst)
            dst.chmod(0o444)

    async def start(self, spec: Spec, state: State) -> State:
        pid, _start = self._pid(spec.id, state)
        if pid is not None:
            st = await self._run_state(spec.id)
            if st == "paused":
                state = await self.resume(spec, state)
            if st not in _ENDED:
                self._watch_console(spec.id)
                await self._agent(spec.id)
                for up in self.on_up:
                    await up(spec.id)
                return state
        assets = vm_assets.assets_ready(self.host.data_dir)
        if assets is None:
            raise BackendFailure(
                "the microVM guest kernel and initramfs are not built: run `den init`"
            )
        if "mac" not in state or "accel" not in state:
            state = {**state, **await self.create(spec)}
        d = self.vmdir(spec.id)
        cg = self.cgroup(spec.id)
        await self._end_processes(spec.id)
        if await asyncio.to_thread(tap.owner, state["tap"]) != spec.uid_start:
            await self._attach(spec, state["mac"])  # missing, or made for another uid
        self._make_vmdir(spec)
        await asyncio.to_thread(
            qemu.make_cgroup, cg, self._mem_limit(spec, state["accel"]), spec.cpu, HOST_PIDS
        )
        # No process of the VM's uid runs now (ended above): what it left is removed
        # before den writes anything here.
        for name in (
            "qemu.pid",
            "qmp.sock",
            "agent.sock",
            "console.sock",
            "console.log",
            "start.log",
        ):
            (d / name).unlink(missing_ok=True)
        await asyncio.to_thread(self._link_assets, spec, assets)
        t0 = time.monotonic()
        with timed("virtiofsd", ws=spec.id):
            await asyncio.gather(
                qemu.start_virtiofsd(d / "root.sock", spec.rootfs, cg, d / "start.log"),
                qemu.start_virtiofsd(d / "code.sock", spec.code, cg, d / "start.log"),
            )
        for sock in ("root.sock", "code.sock"):  # virtiofsd's (root): QEMU connects to them
            os.chown(d / sock, spec.uid_start, spec.uid_start, follow_symlinks=False)
        with timed("qemu", ws=spec.id):
            await qemu.start_qemu(self._argv(spec, state, assets), cg, d / "start.log")
        self._watch_console(spec.id)
        pid = _read_pid(d / "qemu.pid")
        start = qemu.proc_start(pid) if pid and self._is_ours(spec.id, pid) else None
        if pid is None or start is None:
            await self._console_settled(spec.id)
            raise BackendFailure(f"QEMU exited at once: {self._why(spec.id)}")
        state = {
            **state,
            "pid": pid,
            "pid_start": start,
            "boot_id": _boot_id(),
            "cpus": self._cpus(spec),
            "memory_mb": spec.memory_mb,
        }
        state.pop("restart_needed", None)
        ups = asyncio.ensure_future(asyncio.gather(*(up(spec.id) for up in self.on_up)))
        try:
            with timed("guest boot", ws=spec.id):
                await self._boot_wait(spec.id, pid, start, BOOT_TIMEOUT.get(state["accel"], 90.0))
        except BaseException:
            await self._end_processes(spec.id)
            raise
        finally:
            await ups
        # The agent set the guest's clock from the first hello den sent, which the
        # guest reads only once it has booted (seconds later under TCG; the retries
        # repeat that hello's time): set it again now, from the host's clock.
        await self._settime(spec.id)
        log.info(
            "microVM booted",
            extra={"ctx": {"ws": spec.id, "seconds": round(time.monotonic() - t0, 3)}},
        )
        return state

    async def _boot_wait(self, ws_id: str, pid: int, start: int, timeout: float) -> None:
        """Until the agent answers; fails as soon as QEMU ends (init failed, panic)."""
        opening = asyncio.ensure_future(self._agent(ws_id, timeout=timeout))
        try:
            while not opening.done():
                if not qemu.alive(pid, start):
                    await self._console_settled(ws_id)
                    raise BackendFailure(f"the microVM did not boot: {self._why(ws_id)}")
                await asyncio.wait({opening}, timeout=0.05)
            opening.result()
        except AgentGone:
            raise BackendFailure(
                f"the microVM's agent did not answer: {self._why(ws_id)}"
            ) from None
        finally:
            if not opening.done():
                opening.cancel()
                with contextlib.suppress(BaseException):
                    await opening

    def _why(self, ws_id: str) -> str:
        watched = self._consoles.get(ws_id)
        if watched is not None:
            watched[0].flush()  # what den read so far, not what it wrote half a second ago
        d = self.vmdir(ws_id)
        return _tail(d / "console.log", 4) or _tail(d / "start.log", 2) or "no console output"

    async def _agent(self, ws_id: str, timeout: float = 5.0) -> AgentChannel:
        """The VM's agent connection, opened once (a second open resets the guest side)."""
        ch = self._agents.get(ws_id)
        if ch is not None and ch.alive:
            return ch
        lock = self._agent_locks.setdefault(ws_id, asyncio.Lock())
        async with lock:
            ch = self._agents.get(ws_id)
            if ch is not None and ch.alive:
                return ch
            ch = await AgentChannel.open(self.vmdir(ws_id) / "agent.sock", timeout)
            self._agents[ws_id] = ch
            return ch

    def _watch_console(self, ws_id: str) -> None:
        """Read the VM's console (once per VM; again after a daemon restart)."""
        watched = self._consoles.get(ws_id)
        if watched is not None and not watched[1].done():
            return
        con = vm_console.Console(self.vmdir(ws_id))
        self._consoles[ws_id] = (con, tasks.spawn(con.run(), name=f"microvm console {ws_id}"))

    async def _console_settled(self, ws_id: str, timeout: float = 1.0) -> None:
        """QEMU ended: let the console's reader take its last bytes (a panic) and
        write them out; given up after ``timeout``."""
        watched = self._consoles.get(ws_id)
        if watched is None:
            return
        con, task = watched
        if not task.done():
            await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            con.flush()
        self._consoles.pop(ws_id, None)

    async def _forget(self, ws_id: str) -> None:
        ch = self._agents.pop(ws_id, None)
        if ch is not None:
            await ch.close()
        mon = self._monitors.pop(ws_id, None)
        if mon is not None:
            await mon.close()

    async def _run_state(self, ws_id: str) -> str:
        try:
            reply = await self.monitor(ws_id).execute("query-status")
        except BackendFailure:
            return "unknown"
        return str(reply.get("status", "unknown")) if isinstance(reply, dict) else "unknown"

    async def _end_processes(self, ws_id: str) -> None:
        """Kill whatever of the VM still runs (QEMU, virtiofsd) and remove its sockets
        and pid file (the console log stays: it tells why a VM failed). QEMU is
        killed before its connections are closed: nothing may wait on a guest that
        no longer reads before it is gone."""
        cg = self.cgroup(ws_id)
        d = self.vmdir(ws_id)
        pid = _read_pid(d / "qemu.pid")
        if pid is not None and self._is_ours(ws_id, pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        qemu.kill_cgroup(cg)
        if not await qemu.wait_gone(cg, 5.0):
            log.warning("microVM processes survive SIGKILL", extra={"ctx": {"ws": ws_id}})
        await self._console_settled(ws_id)
        await self._forget(ws_id)
        for sock in ("root.sock", "code.sock"):
            qemu.virtiofsd_pid_file(d / sock).unlink(missing_ok=True)
        for name in (
            "root.sock",
            "code.sock",
            "qmp.sock",
            "agent.sock",
            "console.sock",
            "qemu.pid",
        ):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                (d / name).unlink()

    async def stop(self, spec: Spec, state: State) -> State:
        for down in self.on_down:
            await down(spec.id)
        pid, start = self._pid(spec.id, state)
        if pid is not None and start is not None:
            mon = self.monitor(spec.id)
            with contextlib.suppress(BackendFailure):
                if await self._run_state(spec.id) == "paused":
                    await mon.execute("cont")
            asked = False
            with contextlib.suppress(BackendFailure, OSError, TimeoutError):
                ch = await self._agent(spec.id, timeout=1.0)
                await asyncio.wait_for(ch.poweroff(), 2.0)
                asked = True
            # No agent (still booting, or broken): no clean poweroff to wait for.
            if not (asked and await _wait_dead(pid, start, POWEROFF_SECONDS)):
                with contextlib.suppress(BackendFailure):
                    await mon.execute("quit")
                await _wait_dead(pid, start, QUIT_SECONDS)
        await self._end_processes(spec.id)
        return {k: v for k, v in state.items() if k not in ("pid", "pid_start")}

    async def suspend(self, spec: Spec, state: State) -> State:
        await self.monitor(spec.id).execute("stop")
        return state

    async def resume(self, spec: Spec, state: State) -> State:
        await self.monitor(spec.id).execute("cont")
        # The guest's clock stood still while it was stopped: set it, off the hot path.
        tasks.spawn(self._settime(spec.id), name=f"microvm settime {spec.id}")
        return state

    async def _settime(self, ws_id: str) -> None:
        with contextlib.suppress(BackendFailure, OSError, TimeoutError):
            ch = await self._agent(ws_id)
            await asyncio.wait_for(ch.settime(), 5.0)

    async def delete(self, spec: Spec, state: State) -> None:
        await self.stop(spec, state)
        await self._remove_host_parts(spec.id)

    async def _remove_host_parts(self, ws_id: str) -> None:
        await self._end_processes(ws_id)
        await asyncio.to_thread(tap.detach, self.instance, self.tap(ws_id), self.network.bridge)
        await self.network.refresh_exceptions()

        def files() -> None:
            shutil.rmtree(self.vmdir(ws_id), ignore_errors=True)
            cgroups.remove(self.cgroup(ws_id))

        await asyncio.to_thread(files)
        self._agent_locks.pop(ws_id, None)

    async def update_resources(self, spec: Spec, state: State) -> State:
        """The CPU quota changes live; the vCPU count and the guest's memory (and so
        the cgroup's memory limit) only at the next start."""
        cg = self.cgroup(spec.id)
        if not cgroups.dirs(cg):
            return state
        pid, _ = self._pid(spec.id, state)
        accel = state.get("accel", "tcg")
        running = pid is not None
        mem = None if running else self._mem_limit(spec, accel)
        await asyncio.to_thread(qemu.set_limits, cg, mem, spec.cpu, HOST_PIDS)
        booted = (state.get("memory_mb"), state.get("cpus"))
        if running and booted != (spec.memory_mb, self._cpus(spec)):
            why = (
                f"memory {spec.memory_mb} MiB and {self._cpus(spec)} vCPU apply at the next start "
                f"(running with {booted[0]} MiB, {booted[1]} vCPU)"
            )
            log.info("microVM needs a restart", extra={"ctx": {"ws": spec.id, "why": why}})
            return {**state, "restart_needed": why}
        return {k: v for k, v in state.items() if k != "restart_needed"}

    async def _user(self, spec: Spec, user: str) -> tuple[int, int, str]:
        ids, home = await resolve_user(spec.rootfs, user)
        uid, gid = ids.split(":")
        return int(uid), int(gid), home

    async def _context(
        self, spec: Spec, req: ExecRequest
    ) -> tuple[AgentChannel, int, int, dict[str, str], str]:
        uid, gid, home = await self._user(spec, req.user)
        env = {"PATH": PATH, "HOME": home, "LANG": "C.UTF-8", **req.env}
        try:
            ch = await self._agent(spec.id)
        except AgentGone as exc:
            raise BackendFailure(f"the microVM does not answer: {exc.message}") from None
        return ch, uid, gid, env, req.cwd or home

    async def exec(self, spec: Spec, state: State, req: ExecRequest) -> ExecResult:
        ch, uid, gid, env, cwd = await self._context(spec, req)
        with timed("agent exec", ws=spec.id):
            return await ch.run(
                req.argv,
                env,
                cwd,
                uid,
                gid,
                [],
                stdin=req.stdin,
                timeout=req.timeout,
                max_output=req.max_output,
            )

    async def exec_stream(
        self, spec: Spec, state: State, req: ExecRequest, *, tty: Terminal | None = None
    ) -> ExecStream:
        ch, uid, gid, env, cwd = await self._context(spec, req)
        if tty is not None:
            env["TERM"] = tty.term
        return await ch.exec(req.argv, env, cwd, uid, gid, [], tty=tty)

    async def sftp(self, spec: Spec, state: State, user: str) -> ExecStream:
        acct = await load_account(spec.rootfs, user)
        for rel in SFTP_SERVERS:
            if exists_inside(spec.rootfs, rel):
                env = {"PATH": PATH, "HOME": acct.home, "USER": acct.name, "LOGNAME": acct.name}
                ch = await self._agent(spec.id)
                return await ch.exec([f"/{rel}"], env, acct.home, acct.uid, acct.gid, [])
        raise BackendFailure(
            f"the image {spec.image} has no sftp-server; scp and sftp into a microVM need "
            "OpenSSH's sftp-server in the image (apt install openssh-sftp-server inside, "
            "or build the image with den's presets, which carry it)"
        )

    async def connect(self, spec: Spec, state: State, host: str, port: int) -> socket.socket:
        ch = await self._agent(spec.id)
        return await asyncio.wait_for(ch.connect_tcp(host, port), 10.0)

    async def status(self, spec: Spec, state: State) -> Status:
        pid, _ = self._pid(spec.id, state)
        if pid is None:
            await self._console_settled(spec.id)
            if not self.vmdir(spec.id).exists():
                return "missing"
            return "failed" if self._ended_alone(spec, state) else "stopped"
        self._watch_console(spec.id)  # a VM this daemon found running (after a restart)
        st = await self._run_state(spec.id)
        if st == "paused":
            return "suspended"
        if st in _FAILED_RUN:
            return "failed"
        if st == "shutdown":
            return "stopped"
        return "running"

    def _ended_alone(self, spec: Spec, state: State) -> bool:
        """QEMU is gone though den booted it in this host boot and never stopped it,
        and the guest did not power itself off."""
        if "pid" not in state or state.get("boot_id") != _boot_id():
            return False
        console = _tail(self.vmdir(spec.id) / "console.log", 6)
        return _POWER_DOWN not in console or _PANIC in console or _INIT_FAILED in console

    async def failure(self, spec: Spec, state: State) -> str:
        pid, _ = self._pid(spec.id, state)
        if pid is not None:
            st = await self._run_state(spec.id)
            return f"QEMU reports the guest {st}: {self._why(spec.id)}"
        await self._console_settled(spec.id)
        d = self.vmdir(spec.id)
        # The panic's own line comes before its dump (dozens of lines): all of it read
        console = _tail(d / "console.log", 1000, width=64 << 10).split(" / ")
        for marker, what in (
            (_PANIC, "the guest kernel panicked"),
            (_INIT_FAILED, "den-init failed"),
        ):
            line = next((x for x in console if marker in x), None)
            if line is not None:
                return f"{what}: {line}"[:500]
        last = " / ".join(console[-3:]) or "no console output"
        return f"QEMU ended without den stopping it (killed or crashed); console: {last}"[:500]

    async def stats(self, spec: Spec, state: State) -> Stats:
        cg = self.cgroup(spec.id)
        rx, tx = tap.counters(self.tap(spec.id))
        return Stats(
            cpu_seconds=cgroups.cpu_seconds(cg),
            memory_bytes=cgroups.memory_bytes(cg),
            pids=cgroups.pids(cg),
            net_rx_bytes=rx,
            net_tx_bytes=tx,
        )

    def running(self, ws_id: str) -> bool:
        pid = _read_pid(self.vmdir(ws_id) / "qemu.pid")
        return pid is not None and self._is_ours(ws_id, pid)

    async def orphans(self, known_ids: set[str]) -> list[str]:
        def found() -> set[str]:
            ids: set[str] = set()
            if self.vms.is_dir():
                ids.update(p.name for p in self.vms.iterdir() if p.is_dir())
            prefix = self.tap("")
            for name in tap.taps(self.instance):
                short = name[len(prefix) :]
                if not any(k.startswith(short) for k in known_ids | ids):
                    ids.add(short)
            return ids

        return sorted(i for i in await asyncio.to_thread(found) if i not in known_ids)

    async def remove_orphan(self, ws_id: str) -> None:
        await self._remove_host_parts(ws_id)
        for down in self.on_down:
            await down(ws_id)

    async def teardown_host(self) -> None:
        def work() -> None:
            tap.remove_table(self.instance)
            with contextlib.suppress(OSError):
                self.vms.rmdir()

        await asyncio.to_thread(work)


def _check_hostname(hostname: str) -> None:
    # On the kernel command line: only what den's name rules allow.
    if not _HOSTNAME.fullmatch(hostname):
        raise InvalidParams(f"hostname {hostname!r} is not a valid host name", field="name")


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _read_pid(path: Path) -> int | None:
    text = vm_console.read_log(path, 32).strip()
    return int(text) if text.isdigit() else None


def _tail(path: Path, lines: int, width: int = 500) -> str:
    """The last lines of a log in a VM directory (its last 64 KiB read), joined,
    at most ``width`` characters, without the guest's escapes and control characters."""
    text = vm_console.read_log(path, 64 << 10).decode(errors="replace")
    kept = (vm_console.clean(s, width).strip() for s in text.splitlines()[-lines:])
    return " / ".join(s for s in kept if s)[:width]


async def _wait_dead(pid: int, start: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while qemu.alive(pid, start):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
