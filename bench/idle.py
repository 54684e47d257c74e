"""Benchmark: the cost of the idle checker and the metrics sampler.

Creates N idle workspaces (default 200) with idle suspension off, then
measures the daemon's own CPU use (utime + stime from /proc) over a window
while only the background loops run, at the default intervals (idle check
every 30 s, a metric sample every 5 s) and at a stressed setting. Prints a
table and one JSON line. Goal: under 2% of one core with 200 workspaces.

    .venv/bin/python bench/idle.py [--count 200] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

from _daemon import BenchDaemon
from den.cli.client import Client

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def busybox_image(c: Client) -> None:
    """A tiny image: busybox, root, enough for tini and sleep."""
    with tempfile.TemporaryDirectory(prefix="den-bench-bb-") as tmp:
        root = Path(tmp) / "rootfs"
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "root", "run"):
            (root / d).mkdir(parents=True)
        shutil.copy2("/bin/busybox", root / "bin" / "busybox")
        for applet in ("sh", "sleep", "true"):
            (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        tarball = Path(tmp) / "bb.tar"
        subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."], check=True
        )
        job = c.call("image.import", {"name": "bb", "path": str(tarball)})
        while job["state"] == "running":
            time.sleep(0.2)
            job = c.call("job.get", {"id": job["id"]})
        if job["state"] != "done":
            raise RuntimeError(f"image import failed: {job}")


def measure(count: int, seconds: float, env: dict[str, str]) -> dict[str, float]:
    env = {"DEN_IDLE_SUSPEND": "0", "DEN_DEFAULT_MEMORY": "64M", "DEN_DEFAULT_IMAGE": "bb", **env}
    with BenchDaemon(pool_size="8G", extra_env=env) as d:
        assert d.proc is not None
        c = Client(socket_path=str(d.socket))
        busybox_image(c)
        # Hundreds of workspaces: past a member's default quotas.
        unlimited = dict.fromkeys(("max_workspaces", "max_cpu", "max_memory_mb", "max_disk_mb"), -1)
        c.call("user.create", {"name": "bench", **unlimited})
        for i in range(count):
            c.call("workspace.create", {"name": f"w{i}", "user": "bench"})
        time.sleep(2)  # let the creates settle
        before = cpu_seconds(d.proc.pid)
        t0 = time.monotonic()
        time.sleep(seconds)
        used = cpu_seconds(d.proc.pid) - before
        elapsed = time.monotonic() - t0
        for i in range(count):
            c.call("workspace.delete", {"ref": f"bench/w{i}"})
        c.close()
    return {"cpu_seconds": round(used, 3), "percent_of_core": round(100 * used / elapsed, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=200, help="Idle workspaces.")
    ap.add_argument("--seconds", type=float, default=60.0, help="Measuring window.")
    args = ap.parse_args()
    settings = {
        "defaults (idle 30 s, metrics 5 s)": {},
        "stressed (idle 5 s, metrics 1 s)": {
            "DEN_IDLE_CHECK_INTERVAL": "5",
            "DEN_METRICS_INTERVAL": "1",
        },
    }
    results = {name: measure(args.count, args.seconds, env) for name, env in settings.items()}
    table = Table(title=f"den background loops with {args.count} idle workspaces")
    for col in ("setting", "CPU s", "% of one core"):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(name, str(r["cpu_seconds"]), str(r["percent_of_core"]))
    Console().print(table)
    default = next(iter(results.values()))
    print(
        json.dumps(
            {
                "bench": "idle",
                "workspaces": args.count,
                "window_s": args.seconds,
                "results": results,
                "goal": {"percent_of_core_lt_2": default["percent_of_core"] < 2},
            }
        )
    )


if __name__ == "__main__":
    main()
