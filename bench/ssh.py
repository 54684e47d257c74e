"""Benchmark: the SSH gateway beside a stock OpenSSH sshd on the same rootfs.

- round trip of ``ssh HOST true`` through the gateway into a running workspace
  (Debian bookworm minbase), and through Debian's sshd started here on
  127.0.0.1 with its own config and host keys, chrooted into the same rootfs;
- the same round trip into a suspended workspace (resume on connect);
- sftp of a 256 MB file up and down, gateway vs sshd's internal-sftp.

Goals: round trip <= 0.5x OpenSSH's; sftp >= 0.5x OpenSSH's. Prints a table
and one JSON line. Needs root; installs openssh-server when sshd is missing.

    .venv/bin/python bench/ssh.py [--runs 20] [--mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

from _daemon import ROOT, BenchDaemon
from den.cli.client import Client

CACHE = ROOT / ".cache" / "images" / "bookworm-minbase.tar.zst"
IMAGE = "debian"
SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_job(c: Client, job: dict[str, Any]) -> None:
    while job["state"] == "running":
        time.sleep(0.5)
        job = c.call("job.get", {"id": job["id"]})
    if job["state"] != "done":
        raise RuntimeError(f"image job failed: {job}")


def ensure_sshd() -> None:
    if SSHD.exists():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # policy-rc.d keeps the package from starting a system-wide sshd.
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "openssh-server"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


class Sshd:
    """Debian's sshd on 127.0.0.1:PORT, root's sessions chrooted into ``rootfs``."""

    def __init__(self, base: Path, rootfs: Path, pubkey: str) -> None:
        self.dir = base / "sshd"
        self.dir.mkdir()
        # sshd wants every component of the chroot path root-owned and not
        # writable by others (/tmp is not): a bind mount under /run/den.
        self.root = Path(tempfile.mkdtemp(prefix="bench-sshd-", dir="/run/den"))
        self.root.chmod(0o755)
        self.proc: subprocess.Popen[bytes] | None = None
        subprocess.run(["mount", "--bind", str(rootfs), str(self.root)], check=True)
        try:
            self._start(self.root, pubkey)
        except BaseException:
            self.stop()
            raise

    def _start(self, rootfs: Path, pubkey: str) -> None:
        self.port = free_port()
        for kind in ("ed25519", "rsa"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(self.dir / f"host_{kind}")],
                check=True,
            )
        (self.dir / "authorized_keys").write_text(pubkey + "\n")
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\n"
            f"HostKey {self.dir / 'host_ed25519'}\nHostKey {self.dir / 'host_rsa'}\n"
            f"PidFile {self.dir / 'sshd.pid'}\nAuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUseDNS no\n"
            f"ChrootDirectory {rootfs}\nSubsystem sftp internal-sftp\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.dir / "log", "wb") as log:
            proc = self.proc = subprocess.Popen(
                [str(SSHD), "-D", "-e", "-f", str(self.dir / "sshd_config")], stderr=log
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((self.dir / "log").read_text()) from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        subprocess.run(["umount", str(self.root)], check=False)
        self.root.rmdir()


def opts(key: Path, port: int) -> list[str]:
    return [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-i",
        str(key),
        "-p",
        str(port),
    ]


def round_trip(key: Path, port: int, login: str) -> float:
    t = time.perf_counter()
    subprocess.run(
        ["ssh", *opts(key, port), f"{login}@127.0.0.1", "true"],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return (time.perf_counter() - t) * 1e3


def sftp(key: Path, port: int, login: str, batch: str) -> float:
    o = [x if x != "-p" else "-P" for x in opts(key, port)]
    t = time.perf_counter()
    subprocess.run(
        ["sftp", "-q", *o, "-b", "-", f"{login}@127.0.0.1"],
        input=batch.encode(),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t


def med(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--mb", type=int, default=256)
    args = ap.parse_args()
    ensure_sshd()
    work = Path(tempfile.mkdtemp(prefix="den-bench-ssh-"))
    results: dict[str, Any] = {}
    sshd: Sshd | None = None
    try:
        key = work / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        pub = key.with_suffix(".pub").read_text().strip()
        payload = work / "payload"
        with open(payload, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        with BenchDaemon(pool_size="8G") as d:
            c = Client(socket_path=str(d.socket), timeout=600)
            job = (
                c.call("image.import", {"name": IMAGE, "path": str(CACHE)})
                if CACHE.is_file()
                else c.call(
                    "image.build", {"name": IMAGE, "suite": "bookworm", "variant": "minbase"}
                )
            )
            wait_job(c, job)
            c.call("user.create", {"name": "bench", "role": "member"})
            c.call("key.add", {"user": "bench", "key": pub})
            ws = c.call("workspace.create", {"name": "box", "user": "bench", "image": IMAGE})
            port = int(d.info["ssh_port"])
            rootfs = d.data_dir / "pool" / "volumes" / ws["id"] / "rootfs"
            sshd = Sshd(work, rootfs, pub)
            for p, login in ((port, "box"), (sshd.port, "root")):
                round_trip(key, p, login)  # warm up both
            gw = [round_trip(key, port, "box") for _ in range(args.runs)]
            ossh = [round_trip(key, sshd.port, "root") for _ in range(args.runs)]
            # Pairs of (running, suspended) connections, interleaved so that the
            # load of the machine drifts out of the difference.
            resumed, added = [], []
            for _ in range(max(5, args.runs // 2)):
                warm = round_trip(key, port, "box")
                c.call("workspace.suspend", {"ref": "bench/box"})
                cold = round_trip(key, port, "box")
                resumed.append(cold)
                added.append(cold - warm)
            up = f"put {payload} /tmp/payload\n"
            down = f"get /tmp/payload {work / 'back'}\n"
            gw_up = sftp(key, port, "box", up)
            gw_down = sftp(key, port, "box", down)
            os_up = sftp(key, sshd.port, "root", up)
            os_down = sftp(key, sshd.port, "root", down)
            results = {
                "round_trip_ms": {
                    "gateway": med(gw),
                    "openssh": med(ossh),
                    "gateway_min": round(min(gw), 1),
                    "openssh_min": round(min(ossh), 1),
                },
                "round_trip_ratio": round(statistics.median(gw) / statistics.median(ossh), 2),
                "resume_on_connect_ms": med(resumed),
                "resume_added_ms": round(statistics.median(added), 1),
                "sftp_mb_s": {
                    "gateway_up": round(args.mb / gw_up, 1),
                    "gateway_down": round(args.mb / gw_down, 1),
                    "openssh_up": round(args.mb / os_up, 1),
                    "openssh_down": round(args.mb / os_down, 1),
                },
                "sftp_ratio_up": round(os_up / gw_up, 2),
                "sftp_ratio_down": round(os_down / gw_down, 2),
                "runs": args.runs,
                "mb": args.mb,
            }
            sshd.stop()
            sshd = None
            c.close()
    finally:
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(work, ignore_errors=True)
    table = Table(title="ssh gateway vs OpenSSH sshd (same rootfs)")
    for col in ("measure", "gateway", "OpenSSH", "ratio", "goal"):
        table.add_column(col)
    rt, sf = results["round_trip_ms"], results["sftp_mb_s"]
    table.add_row(
        "ssh true, median ms",
        str(rt["gateway"]),
        str(rt["openssh"]),
        str(results["round_trip_ratio"]),
        "<= 0.5",
    )
    table.add_row(
        "ssh true into suspended, ms",
        str(results["resume_on_connect_ms"]),
        "-",
        f"+{results['resume_added_ms']} ms",
        "",
    )
    table.add_row(
        f"sftp put {args.mb} MB, MB/s",
        str(sf["gateway_up"]),
        str(sf["openssh_up"]),
        str(results["sftp_ratio_up"]),
        ">= 0.5",
    )
    table.add_row(
        f"sftp get {args.mb} MB, MB/s",
        str(sf["gateway_down"]),
        str(sf["openssh_down"]),
        str(results["sftp_ratio_down"]),
        ">= 0.5",
    )
    Console().print(table)
    print(json.dumps({"bench": "ssh", **results}))


if __name__ == "__main__":
    main()
