"""Benchmark: exec in a workspace, streaming and not, beside crun and podman.

For `true` and for a 10 MB output (`head -c 10000000 /dev/zero`), N runs each
(default 20): time to the first output byte and total time of

- den, streaming: the websocket GET /v1/exec on the unix socket (den's client,
  den.cli.execstream.stream, in this process: no CLI start-up);
- den, not streaming: POST /rpc workspace.exec on the unix socket (the whole
  output arrives with the answer, so first byte = total; exec_max_output is
  raised to 16 MiB for the run so the 10 MB come back whole);
- `den exec` (the CLI, streaming): with Python's start-up, as a person runs it;
- `crun exec` on the same container (den's crun root), run directly;
- `podman exec` in a podman container from the same rootfs (started for the run
  and removed after).

Prints a table (p50/p95 in ms) and one JSON line. Needs root; makes its own
daemon, pool and busybox image, and removes them.

    .venv/bin/python bench/exec.py [--count 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

from _daemon import DEN, BenchDaemon, busybox_image
from den.cli.client import Client
from den.cli.execstream import stream

IMAGE = "bb"
SIZE = 10_000_000
TRUE = ["true"]
BIG = ["head", "-c", str(SIZE), "/dev/zero"]
Timing = tuple[float, float]  # (first byte, total) in ms; first byte is total when no output


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def timed_process(argv: list[str], env: dict[str, str] | None = None) -> Timing:
    """Run ``argv``, reading its stdout as it comes; (first byte, total) in ms."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert p.stdout is not None
    fd = p.stdout.fileno()
    first = 0.0
    size = 0
    while data := os.read(fd, 1 << 16):
        if not size:
            first = time.perf_counter() - t0
        size += len(data)
    rc = p.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{argv[:3]} exited {rc}")
    return (first or total) * 1e3, total * 1e3


class Counter:
    """A binary sink that notes when its first byte came."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.first = 0.0
        self.size = 0

    def write(self, data: bytes) -> int:
        if not self.size:
            self.first = time.perf_counter() - self.t0
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def den_stream(socket_path: str, ref: str, argv: list[str]) -> Timing:
    t0 = time.perf_counter()
    sink = Counter(t0)
    end = asyncio.run(
        stream({"ref": ref, "argv": argv}, socket_path=socket_path, stdout=sink, stderr=sink)  # type: ignore[arg-type]
    )
    total = time.perf_counter() - t0
    assert end["exit_code"] == 0, end
    return (sink.first or total) * 1e3, total * 1e3


def den_rpc(c: Client, ref: str, argv: list[str]) -> Timing:
    t0 = time.perf_counter()
    res = c.call("workspace.exec", {"ref": ref, "argv": argv})
    total = (time.perf_counter() - t0) * 1e3
    assert res["exit_code"] == 0 and not res["truncated"], {**res, "stdout": len(res["stdout"])}
    return total, total


def podman_container(rootfs: Path) -> str | None:
    """A running podman container on ``rootfs`` (an overlay over it), or None."""
    if shutil.which("podman") is None:
        return None
    name = f"den-bench-exec-{secrets.token_hex(3)}"
    argv = [
        "podman",
        "run",
        "-d",
        "--rm",
        "--name",
        name,
        "--network",
        "none",
        # den's limits, not the host's: podman's default nofile is above what
        # its crun may set here.
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
        "--rootfs",
        f"{rootfs}:O",  # an overlay: podman writes /etc/mtab into the rootfs
        "/bin/sleep",
        "3600",
    ]
    if subprocess.run(argv, capture_output=True, check=False).returncode != 0:
        return None
    return name


def measure(runs: dict[str, Callable[[list[str]], Timing]], count: int) -> dict[str, Any]:
    """Each way, turn about, ``count`` times for each command (after one warm-up)."""
    samples: dict[str, dict[str, list[Timing]]] = {k: {"true": [], "10MB": []} for k in runs}
    for fn in runs.values():
        fn(TRUE)
        fn(BIG)
    for _ in range(count):
        for way, fn in runs.items():
            samples[way]["true"].append(fn(TRUE))
            samples[way]["10MB"].append(fn(BIG))
    out: dict[str, Any] = {}
    for way, by_cmd in samples.items():
        out[way] = {
            "true_total": [t for _, t in by_cmd["true"]],
            "10MB_first_byte": [f for f, _ in by_cmd["10MB"]],
            "10MB_total": [t for _, t in by_cmd["10MB"]],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    env = {"DEN_EXEC_MAX_OUTPUT": str(16 << 20), "DEN_EXEC_MAX_CONCURRENT": "100"}
    podman: str | None = None
    with BenchDaemon(pool_size="4G", extra_env=env) as d:
        c = Client(socket_path=str(d.socket), timeout=600)
        try:
            busybox_image(c, IMAGE)
            c.call("user.create", {"name": "bench", "role": "admin"})
            ws = c.call("workspace.create", {"name": "bx", "user": "bench", "image": IMAGE})
            ref = ws["ref"]
            cid = f"den{d.instance}-{ws['id']}"
            crun = ["crun", "--root", f"/run/den/crun{d.instance}", "exec", cid]
            podman = podman_container(d.data_dir / "pool" / "images" / IMAGE)
            runs: dict[str, Callable[[list[str]], Timing]] = {
                "den stream (ws)": lambda argv: den_stream(str(d.socket), ref, argv),
                "den rpc (POST /rpc)": lambda argv: den_rpc(c, ref, argv),
                "den exec (CLI)": lambda argv: timed_process(
                    [DEN, "exec", ref, "--", *argv], {**d.env}
                ),
                "crun exec": lambda argv: timed_process([*crun, *argv]),
            }
            if podman is not None:
                runs["podman exec"] = lambda argv: timed_process(["podman", "exec", podman, *argv])
            results = measure(runs, args.count)
        finally:
            if podman is not None:
                subprocess.run(["podman", "rm", "-f", "-t", "0", podman], capture_output=True)
            c.close()
    table = Table(title=f"exec: `true` and a 10 MB output, ms (n={args.count} each)")
    table.add_column("way")
    for col in ("true total", "10MB first byte", "10MB total"):
        table.add_column(f"{col} p50", justify="right")
        table.add_column("p95", justify="right")
    summary: dict[str, Any] = {}
    for way, cols in results.items():
        cells = []
        summary[way] = {}
        for key, values in cols.items():
            p50, p95 = pct(values, 0.5), pct(values, 0.95)
            summary[way][key] = {"p50": p50, "p95": p95}
            cells += [f"{p50:.1f}", f"{p95:.1f}"]
        table.add_row(way, *cells)
    Console().print(table)
    print(json.dumps({"bench": "exec", "count": args.count, "ms": summary}))


if __name__ == "__main__":
    main()
