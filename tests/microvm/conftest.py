"""Fixtures of the microVM tests: den's guest assets, and a QEMU microvm booted by hand.

The assets (Debian's cloud kernel and den's initramfs) are built once into
``.cache/microvm`` from the real Debian package and kept across sessions: later
runs find them up to date (the stamp: the kernel package, init.sh, the agent's
source) and build only when one of those changed. :func:`seed_assets` copies
them into a daemon's data directory so that its own ``ensure_assets`` finds them
built.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from den.backends.microvm import assets as mv
from tests.conftest import ROOT

ASSET_CACHE = ROOT / ".cache" / "microvm"  # a data directory of its own: assets in ./microvm
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


@pytest.fixture(scope="session")
def microvm_assets() -> mv.Assets:
    """den's kernel and initramfs, built from the real Debian package (once per cache)."""
    return asyncio.run(mv.ensure_assets(ASSET_CACHE))


def seed_assets(data_dir: Path) -> None:
    """Put the session's built assets into ``data_dir``/microvm (before its daemon builds)."""
    src, dst = mv.asset_dir(ASSET_CACHE), mv.asset_dir(data_dir)
    dst.mkdir(parents=True, exist_ok=True)
    dst.chmod(0o700)
    for name in ("vmlinuz", "initrd.img", "stamp.json"):
        shutil.copy2(src / name, dst / name)


class Guest:
    """A microVM started by hand: QEMU under TCG with den's assets, a virtiofsd per
    shared directory, the agent's port on a unix socket; everything ended on exit."""

    def __init__(self, base: Path, assets: mv.Assets) -> None:
        self.base = base
        self.assets = assets
        self.console = base / "console.log"
        self.agent_sock = base / "agent.sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.qemu: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self, shares: dict[str, Path], cmdline: str, memory_mb: int = 512) -> None:
        argv = mv.qemu_base_argv(self.assets, "tcg", memory_mb, self.console)
        argv += [
            "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
            "-numa", "node,memdev=mem", "-global", "virtio-mmio.force-legacy=false",
        ]  # fmt: skip
        for tag, path in shares.items():
            sock = self.base / f"fs-{tag}.sock"
            self.procs.append(
                subprocess.Popen(
                    [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={path}",
                     "-o", "cache=auto"],
                    stdout=subprocess.DEVNULL,
                    stderr=(self.base / f"virtiofsd-{tag}.log").open("wb"),
                )
            )  # fmt: skip
            wait_for(sock.exists, 10, f"virtiofsd's socket {sock}")
            argv += [
                "-chardev", f"socket,id=fs-{tag},path={sock}",
                "-device", f"vhost-user-fs-device,chardev=fs-{tag},tag={tag}",
            ]  # fmt: skip
        argv += [
            # restrict=on: the guest's NIC reaches nothing outside QEMU.
            "-netdev", "user,id=n0,restrict=on",
            "-device", "virtio-net-device,netdev=n0,mac=02:de:00:00:00:01",
            "-device", "virtio-serial-device",
            "-chardev", f"socket,id=agent,path={self.agent_sock},server=on,wait=off",
            "-device", "virtserialport,chardev=agent,name=den.agent",
            "-append", f"{mv.base_cmdline()} {cmdline}",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.qemu = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_line(self, *needles: str, timeout: float = 90.0) -> str:
        """The first of ``needles`` to appear on the console (seconds since start logged)."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [n for n in needles if n in self.text()]
            return bool(found)

        wait_for(seen, timeout, f"{needles} on the console:\n{self.text()[-2000:]}")
        return found[0]

    def exited(self, timeout: float) -> int | None:
        assert self.qemu is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.qemu.wait(timeout)
        return None

    def close(self) -> None:
        for p in [*([self.qemu] if self.qemu else []), *self.procs]:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stderr:
                p.stderr.close()


@contextlib.contextmanager
def guest(base: Path, assets: mv.Assets) -> Iterator[Guest]:
    g = Guest(base, assets)
    try:
        yield g
    finally:
        g.close()


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
