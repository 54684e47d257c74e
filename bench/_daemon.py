"""A throwaway den daemon for benchmarks: its own socket, data dir, accounts,
instance number and (optionally) btrfs loopback pool; all removed on exit."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEN = str(Path(sys.executable).parent / "den")
ROOT = Path(__file__).resolve().parent.parent


def allocate_instance() -> tuple[int, int]:
    """An instance number (40-59) that no other benchmark holds."""
    from den.host.instances import claim

    return claim(40, 59, "bench")


class BenchDaemon:
    def __init__(
        self, pool_size: str | None = None, extra_env: dict[str, str] | None = None
    ) -> None:
        tag = secrets.token_hex(2)
        self.instance, self._lock_fd = allocate_instance()
        self.base = Path(tempfile.mkdtemp(prefix="den-bench-"))
        self.base.chmod(0o755)
        self.prefix = f"db{tag}-"
        self.group = f"db{tag}"
        self.socket = self.base / "den.sock"
        self.data_dir = self.base / "data"
        self.pool_size = pool_size
        self.env = {
            **os.environ,
            "DEN_CONFIG": str(self.base / "den.toml"),
            "DEN_INSTANCE": str(self.instance),
            "DEN_SOCKET": str(self.socket),
            "DEN_DATA_DIR": str(self.data_dir),
            "DEN_HTTP_PORT": "0",
            "DEN_SSH_PORT": "0",
            "DEN_ACCOUNT_PREFIX": self.prefix,
            "DEN_SOCKET_GROUP": self.group,
            "DEN_FSTAB": str(self.base / "fstab"),
            "DEN_LOG_LEVEL": os.environ.get("DEN_LOG_LEVEL", "warning"),
            "DEN_RECONCILE_INTERVAL": "0",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BenchDaemon:
        try:
            if self.pool_size:
                self.env["DEN_POOL_SIZE"] = self.pool_size
                subprocess.run(
                    [DEN, "init", "--yes", "--no-image"],
                    env=self.env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            state = self.data_dir / "serve.json"
            # DEN_BENCH_LOG=FILE keeps the daemon's log (with DEN_LOG_LEVEL) for a failed run.
            log = os.environ.get("DEN_BENCH_LOG")
            with open(log or os.devnull, "ab") as err:
                self.proc = subprocess.Popen([DEN, "serve"], env=self.env, stderr=err)
            deadline = time.monotonic() + 30
            while not (state.exists() and self.socket.exists()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("den serve did not start")
                time.sleep(0.05)
            self.info = json.loads(state.read_text())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        from den.host.purge import purge_sync

        with contextlib.suppress(Exception):
            purge_sync(self.instance, self.data_dir)
        self._unmount_pool()
        for pw in pwd.getpwall():
            if pw.pw_name.startswith(self.prefix):
                subprocess.run(["userdel", pw.pw_name], capture_output=True, check=False)
        try:
            grp.getgrnam(self.group)
            subprocess.run(["groupdel", self.group], capture_output=True, check=False)
        except KeyError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)
        from den.host.instances import release

        release(self.instance, self._lock_fd, "bench")

    def _unmount_pool(self) -> None:
        from den.storage.mounts import mounts_under

        for mp in mounts_under(self.data_dir):
            subprocess.run(["umount", "--lazy", mp], capture_output=True, check=False)
        img = self.data_dir / "pool.img"
        res = subprocess.run(
            ["losetup", "-j", str(img)], capture_output=True, text=True, check=False
        )
        for line in res.stdout.splitlines():
            subprocess.run(["losetup", "-d", line.split(":")[0]], capture_output=True, check=False)


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_job(c: Any, job: dict[str, Any]) -> None:
    """Follow an image job to its end (a den Client); raise if it failed."""
    while job["state"] == "running":
        time.sleep(0.5)
        job = c.call("job.get", {"id": job["id"]})
    if job["state"] != "done":
        raise RuntimeError(f"image job failed: {job}")


def busybox_image(c: Any, name: str) -> None:
    """A tiny image (a den Client): static busybox with every applet, root and a
    login shell with line editing (/bin/sh), as the tests' ``bb`` image."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory(prefix="den-bench-bb-") as tmp:
        root = Path(tmp) / "rootfs"
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "run", "home"):
            (root / d).mkdir(parents=True)
        shutil.copy2(busybox, root / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
        for applet in applets.stdout.split():
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\ntty:x:5:\n")
        (root / "tmp").chmod(0o1777)
        tarball = Path(tmp) / "bb.tar"
        subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."], check=True
        )
        wait_job(c, c.call("image.import", {"name": name, "path": str(tarball)}))
