"""Benchmark: the workspace lifecycle on the sandbox backend.

For N workspaces (default 20): p50/p90 of create -> first exec, suspend,
resume -> exec, stop, delete; beside it `podman run --rm --network none` of
`true` on the same rootfs and the ratio; memory per idle workspace (from
cgroups); create time of the 1st vs the 200th workspace. Prints a table and
one JSON line. Needs root; makes its own daemon, pool and image, and removes
them.

    .venv/bin/python bench/lifecycle.py [--count 20] [--scale 200]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

from _daemon import ROOT, BenchDaemon
from den.cli.client import Client

CACHE = ROOT / ".cache" / "images" / "bookworm-minbase.tar.zst"
IMAGE = "debian"


def ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def wait_job(c: Client, job: dict[str, Any]) -> None:
    while job["state"] == "running":
        time.sleep(0.5)
        job = c.call("job.get", {"id": job["id"]})
    if job["state"] != "done":
        raise RuntimeError(f"image job failed: {job}")


def ensure_image(c: Client) -> None:
    if CACHE.is_file():
        job = c.call("image.import", {"name": IMAGE, "path": str(CACHE)})
    else:
        job = c.call("image.build", {"name": IMAGE, "suite": "bookworm", "variant": "minbase"})
    wait_job(c, job)


def podman_times(rootfs: Path, count: int) -> list[float] | None:
    if shutil.which("podman") is None:
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "podman"],
            capture_output=True,
            check=False,
        )
    if shutil.which("podman") is None:
        return None
    argv = [
        "podman",
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=4096:4096",
        "--rootfs",
        f"{rootfs}:O",  # an overlay: podman writes /etc/mtab into the rootfs
        "/bin/true",
    ]
    subprocess.run(argv, capture_output=True, check=False)  # warm-up
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        res = subprocess.run(argv, capture_output=True, check=False)
        if res.returncode != 0:
            return None
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def cgroup_memory(instance: int, ws_id: str) -> int:
    base = Path(f"/sys/fs/cgroup/memory/den{instance}/{ws_id}")
    try:
        usage = int((base / "memory.usage_in_bytes").read_text())
    except OSError:
        return 0
    return usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=20, help="Workspaces per lifecycle step.")
    ap.add_argument("--scale", type=int, default=200, help="Workspaces for the 1st-vs-Nth check.")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {
        k: [] for k in ("create_exec", "suspend", "resume", "resume_exec", "stop", "delete")
    }
    with BenchDaemon(pool_size="20G", extra_env={"DEN_EGRESS": "false"}) as d:
        c = Client(socket_path=str(d.socket))
        ensure_image(c)
        c.call("user.create", {"name": "bench"})
        refs = [f"bench/w{i}" for i in range(args.count)]
        for i, ref in enumerate(refs):
            rows["create_exec"].append(
                ms(
                    lambda i=i, ref=ref: (
                        c.call(
                            "workspace.create", {"name": f"w{i}", "user": "bench", "image": IMAGE}
                        ),
                        c.call("workspace.exec", {"ref": ref, "argv": ["/bin/true"]}),
                    )
                )
            )
        time.sleep(2)
        ids = [c.call("workspace.get", {"ref": r})["id"] for r in refs]
        mem = [cgroup_memory(d.instance, i) for i in ids]
        for ref in refs:
            rows["suspend"].append(ms(lambda ref=ref: c.call("workspace.suspend", {"ref": ref})))
        for ref in refs:
            resume = ms(lambda ref=ref: c.call("workspace.resume", {"ref": ref}))
            exec_ = ms(
                lambda ref=ref: c.call("workspace.exec", {"ref": ref, "argv": ["/bin/true"]})
            )
            rows["resume"].append(resume)
            rows["resume_exec"].append(resume + exec_)
        for ref in refs:
            rows["stop"].append(ms(lambda ref=ref: c.call("workspace.stop", {"ref": ref})))
        for ref in refs:
            rows["delete"].append(ms(lambda ref=ref: c.call("workspace.delete", {"ref": ref})))
        podman = podman_times(d.data_dir / "pool" / "images" / IMAGE, args.count)

        scale: list[float] = []
        for i in range(args.scale):
            scale.append(
                ms(
                    lambda i=i: c.call(
                        "workspace.create", {"name": f"s{i}", "user": "bench", "image": IMAGE}
                    )
                )
            )
        for i in range(args.scale):
            c.call("workspace.delete", {"ref": f"bench/s{i}"})
        c.close()

    table = Table(title=f"den workspace lifecycle, sandbox backend ({args.count} workspaces)")
    for col in ("step", "p50 ms", "p90 ms"):
        table.add_column(col, justify="right")
    summary: dict[str, Any] = {}
    for step, vals in rows.items():
        summary[step] = {"p50_ms": pct(vals, 0.5), "p90_ms": pct(vals, 0.9)}
        table.add_row(step, str(summary[step]["p50_ms"]), str(summary[step]["p90_ms"]))
    if podman:
        summary["podman_run_true"] = {"p50_ms": pct(podman, 0.5), "p90_ms": pct(podman, 0.9)}
        table.add_row("podman run --rm true", str(pct(podman, 0.5)), str(pct(podman, 0.9)))
        ratio = round(summary["create_exec"]["p50_ms"] / summary["podman_run_true"]["p50_ms"], 3)
    else:
        ratio = None
    first = statistics.median(scale[:5])
    last = statistics.median(scale[-5:])
    summary["scale"] = {
        "count": args.scale,
        "first5_p50_ms": round(first, 2),
        "last5_p50_ms": round(last, 2),
        "ratio": round(last / first, 3),
    }
    summary["idle_memory_bytes"] = int(statistics.mean(mem)) if mem else 0
    summary["den_vs_podman"] = ratio
    Console().print(table)
    Console().print(
        f"den/podman create->exec: {ratio}   idle memory per workspace: "
        f"{summary['idle_memory_bytes'] / 1024:.0f} KiB   create #1-5 vs #{args.scale - 4}-{args.scale}:"
        f" {first:.1f} ms vs {last:.1f} ms"
    )
    goals = {
        "create_exec_p50_lt_50ms": summary["create_exec"]["p50_ms"] < 50,
        "den_vs_podman_le_0.3": ratio is not None and ratio <= 0.3,
        "nth_within_20pct": last <= first * 1.2,
    }
    print(json.dumps({"bench": "lifecycle", "results": summary, "goals": goals}))


if __name__ == "__main__":
    main()
