"""Benchmark: the SSH gateway beside a stock OpenSSH sshd on the same rootfs.

- round trip of ``ssh HOST true`` through the gateway into a running workspace
  (den's dev image), and through Debian's sshd started here on
  127.0.0.1 with its own config and host keys, chrooted into the same rootfs;
- the same round trip into a suspended workspace (resume on connect);
- sftp of a 256 MB file up and down, gateway vs sshd's internal-sftp;
- the agent: with ``ssh -A``, a client inside asks the forwarded agent for
  its keys (what ``ssh-add -l`` does: connect to $SSH_AUTH_SOCK, one request),
  against a second sshd without chroot (sshd's agent socket lives outside a
  chroot);
- ``ssh -R``: a process inside connects to the forwarded port and sends 64
  bytes that an echo server on the client's side returns, many times.

Goals: round trip <= 0.5x OpenSSH's; sftp >= 0.5x OpenSSH's; agent and -R
round trips <= 1.0x OpenSSH's. Prints a table and one JSON line. Needs root;
installs openssh-server when sshd is missing.

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
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

from _daemon import ROOT, BenchDaemon, free_port, wait_job
from den.cli.client import Client

CACHE_DIR = ROOT / ".cache" / "images"
IMAGE = "dev"
SSHD = Path("/usr/sbin/sshd")


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
    """Debian's sshd on 127.0.0.1:PORT, root's sessions chrooted into ``rootfs``
    (or on the host itself when ``rootfs`` is None)."""

    def __init__(self, base: Path, rootfs: Path | None, pubkey: str, name: str = "sshd") -> None:
        self.dir = base / name
        self.dir.mkdir()
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        if rootfs is not None:
            # sshd wants every component of the chroot path root-owned and not
            # writable by others (/tmp is not): a bind mount under /run/den.
            self.root = Path(tempfile.mkdtemp(prefix="bench-sshd-", dir="/run/den"))
            self.root.chmod(0o755)
            subprocess.run(["mount", "--bind", str(rootfs), str(self.root)], check=True)
        try:
            self._start(self.root, pubkey)
        except BaseException:
            self.stop()
            raise

    def _start(self, rootfs: Path | None, pubkey: str) -> None:
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
            "Subsystem sftp internal-sftp\nAllowAgentForwarding yes\n"
            "AllowTcpForwarding yes\n" + (f"ChrootDirectory {rootfs}\n" if rootfs else "")
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
        if self.root is not None:
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


# Run inside (the workspace, or the sshd session) by python3: median ms per
# agent request (connect, list identities, close), as ssh-add -l makes it.
AGENT_PROBE = """
import os, socket, statistics, struct, sys, time
def read(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("agent closed")
        b += c
    return b
ts = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.environ["SSH_AUTH_SOCK"])
    s.sendall(struct.pack(">IB", 1, 11))
    body = read(s, struct.unpack(">I", read(s, 4))[0])
    assert body[0] == 12 and struct.unpack(">I", body[1:5])[0] >= 1, body[:8]
    s.close()
    ts.append(time.perf_counter() - t)
print(statistics.median(ts) * 1e3)
"""
# Median ms of a 64-byte echo through a forwarded port (one connection).
ECHO_PROBE = """
import socket, statistics, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg, ts = b"x" * 64, []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    s.sendall(msg)
    got = b""
    while len(got) < 64:
        c = s.recv(64 - len(got))
        if not c:
            sys.exit("echo closed")
        got += c
    ts.append(time.perf_counter() - t)
print(statistics.median(ts) * 1e3)
"""


class Echo:
    """A TCP echo server on 127.0.0.1 (the client's side of ``ssh -R``)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def probe(
    key: Path,
    port: int,
    login: str,
    extra: list[str],
    code: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> float:
    """Run a probe with python3 on the far side of ``ssh``; its median, ms."""
    res = subprocess.run(
        ["ssh", *opts(key, port), *extra, f"{login}@127.0.0.1", "python3", "-", *args],
        input=code.encode(),
        capture_output=True,
        check=False,
        env=env,
    )
    if res.returncode != 0:
        raise RuntimeError(f"probe via {login}@:{port} failed: {res.stderr.decode()[-500:]}")
    return float(res.stdout.decode().split()[-1])


def forwarding(work: Path, key: Path, pub: str, port: int, sshd: Sshd, runs: int) -> dict[str, Any]:
    """The agent and ``-R`` round trips, gateway vs sshd, in interleaved rounds."""
    agent_sock = work / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL)
    echo = Echo()
    host_sshd: Sshd | None = None
    try:
        deadline = time.monotonic() + 10
        while not agent_sock.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("ssh-agent did not start")
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True)
        # sshd makes its agent socket outside any chroot: this one has none.
        host_sshd = Sshd(work, None, pub, name="sshd-host")
        n = str(max(50, runs * 5))
        gw_agent, os_agent, gw_echo, os_echo = [], [], [], []
        inner = 40_000 + os.getpid() % 20_000  # a port inside the workspace
        for _ in range(3):
            gw_agent.append(probe(key, port, "box", ["-A"], AGENT_PROBE, n, env=env))
            os_agent.append(probe(key, host_sshd.port, "root", ["-A"], AGENT_PROBE, n, env=env))
            rem = ["-o", "ExitOnForwardFailure=yes", "-R"]
            gw_echo.append(
                probe(
                    key,
                    port,
                    "box",
                    [*rem, f"{inner}:127.0.0.1:{echo.port}"],
                    ECHO_PROBE,
                    str(inner),
                    str(int(n) * 4),
                )
            )
            outer = free_port()
            os_echo.append(
                probe(
                    key,
                    sshd.port,
                    "root",
                    [*rem, f"{outer}:127.0.0.1:{echo.port}"],
                    ECHO_PROBE,
                    str(outer),
                    str(int(n) * 4),
                )
            )
    finally:
        echo.close()
        if host_sshd is not None:
            host_sshd.stop()
        agent.terminate()
        agent.wait(10)
    ga, oa = statistics.median(gw_agent), statistics.median(os_agent)
    ge, oe = statistics.median(gw_echo), statistics.median(os_echo)
    return {
        "agent_ms": {"gateway": round(ga, 3), "openssh": round(oa, 3)},
        "agent_ratio": round(ga / oa, 2),
        "remote_echo_ms": {"gateway": round(ge, 3), "openssh": round(oe, 3)},
        "remote_echo_ratio": round(ge / oe, 2),
    }


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
        # An 8G pool: the 10G default disk limit would pass the member quota.
        apt = {"DEN_APT_CACHE": str(ROOT / ".cache" / "apt"), "DEN_DEFAULT_DISK": "2G"}
        with BenchDaemon(pool_size="8G", extra_env=apt) as d:
            c = Client(socket_path=str(d.socket), timeout=600)
            # den's dev image (python3 for the probes): the tests' cached copy, else built.
            cached = sorted(CACHE_DIR.glob("bookworm-dev-*.tar.zst"))
            job = (
                c.call("image.import", {"name": IMAGE, "path": str(cached[-1])})
                if cached
                else c.call("image.build", {"name": IMAGE, "suite": "bookworm", "preset": "dev"})
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
            fwd = forwarding(work, key, pub, port, sshd, args.runs)
            results = {
                **fwd,
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
    table.add_row(
        "agent request (ssh -A), median ms",
        str(results["agent_ms"]["gateway"]),
        str(results["agent_ms"]["openssh"]),
        str(results["agent_ratio"]),
        "<= 1.0",
    )
    table.add_row(
        "ssh -R echo 64 B, median ms",
        str(results["remote_echo_ms"]["gateway"]),
        str(results["remote_echo_ms"]["openssh"]),
        str(results["remote_echo_ratio"]),
        "<= 1.0",
    )
    Console().print(table)
    print(json.dumps({"bench": "ssh", **results}))


if __name__ == "__main__":
    main()
