"""Benchmark: the workspace lifecycle on the sandbox backend.

For N workspaces (default 20): p50/p90 of create -> first exec, suspend,
resume -> exec, stop, delete; beside it `podman run --rm --network none` of
`true` on the same rootfs and the ratio; memory per idle workspace (from
cgroups); create time of the 1st vs the 200th workspace; create -> first exec and the
exec round trip with the seccomp profile on and off (two daemons, measured
turn about). Prints a table and
one JSON line. Needs root; makes its own daemon, pool and image, and removes
them.

    .venv/bin/python bench/lifecycle.py [--count 20] [--scale 200] [--seccomp-count 20]
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

from _daemon import ROOT, BenchDaemon, wait_job
from den.cli.client import Client

# A minbase rootfs tarball: the benchmark's own, else the tests' (minbase + git).
CACHES = [
    ROOT / ".cache" / "images" / n
    for n in ("bookworm-minbase.tar.zst", "bookworm-minbase-git-sftp.tar.zst")
]
APT = str(ROOT / ".cache" / "apt")  # the tests' package cache: a build downloads nothing twice
IMAGE = "debian"


def ms(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2)


def ensure_image(c: Client) -> None:
    cached = [p for p in CACHES if p.is_file()]
    if cached:
        job = c.call("image.import", {"name": IMAGE, "path": str(cached[0])})
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


def seccomp_on_off(count: int, execs: int) -> dict[str, Any]:
    """create -> first exec and exec round trips with sandbox_seccomp on and off.

    Two daemons, one per setting, measured turn about (on, off, on, ...) so
    that drift of the machine falls on both alike.
    """
    times: dict[str, dict[str, list[float]]] = {
        side: {"create_exec": [], "exec": []} for side in ("on", "off")
    }
    # Small disks: the pool holds every workspace; admins have no quotas.
    env = {"DEN_EGRESS": "false", "DEN_DEFAULT_DISK": "256M", "DEN_APT_CACHE": APT}
    with (
        BenchDaemon(pool_size="8G", extra_env={**env, "DEN_SANDBOX_SECCOMP": "true"}) as on,
        BenchDaemon(pool_size="8G", extra_env={**env, "DEN_SANDBOX_SECCOMP": "false"}) as off,
    ):
        clients = {
            "on": Client(socket_path=str(on.socket)),
            "off": Client(socket_path=str(off.socket)),
        }
        for c in clients.values():
            ensure_image(c)
            c.call("user.create", {"name": "bench", "role": "admin"})
        true = ["/bin/true"]
        for i in range(count):
            for side, c in clients.items():
                times[side]["create_exec"].append(
                    ms(
                        lambda c=c, i=i: (
                            c.call(
                                "workspace.create",
                                {"name": f"sc{i}", "user": "bench", "image": IMAGE},
                            ),
                            c.call("workspace.exec", {"ref": f"bench/sc{i}", "argv": true}),
                        )
                    )
                )
        for _ in range(execs):
            for side, c in clients.items():
                times[side]["exec"].append(
                    ms(lambda c=c: c.call("workspace.exec", {"ref": "bench/sc0", "argv": true}))
                )
        for c in clients.values():
            for i in range(count):
                c.call("workspace.delete", {"ref": f"bench/sc{i}"})
            c.close()
    out: dict[str, Any] = {}
    for step in ("create_exec", "exec"):
        p50_on, p50_off = pct(times["on"][step], 0.5), pct(times["off"][step], 0.5)
        out[step] = {
            "on_p50_ms": p50_on,
            "off_p50_ms": p50_off,
            "on_p90_ms": pct(times["on"][step], 0.9),
            "off_p90_ms": pct(times["off"][step], 0.9),
            "slower_pct": round((p50_on / p50_off - 1) * 100, 1),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=20, help="Workspaces per lifecycle step.")
    ap.add_argument("--scale", type=int, default=200, help="Workspaces for the 1st-vs-Nth check.")
    ap.add_argument(
        "--seccomp-count",
        type=int,
        default=20,
        help="Workspaces per side for the seccomp on/off comparison (0: skip it).",
    )
    ap.add_argument("--seccomp-execs", type=int, default=200, help="Exec round trips per side.")
    args = ap.parse_args()
    rows: dict[str, list[float]] = {
        k: [] for k in ("create_exec", "suspend", "resume", "resume_exec", "stop", "delete")
    }
    # Disk limits on, as by default, at a size the pool holds --scale times over.
    env = {"DEN_EGRESS": "false", "DEN_DEFAULT_DISK": "64M", "DEN_APT_CACHE": APT}
    with BenchDaemon(pool_size="20G", extra_env=env) as d:
        c = Client(socket_path=str(d.socket))
        ensure_image(c)
        unlimited = dict.fromkeys(("max_workspaces", "max_cpu", "max_memory_mb", "max_disk_mb"), -1)
        c.call("user.create", {"name": "bench", **unlimited})
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
    seccomp = seccomp_on_off(args.seccomp_count, args.seccomp_execs) if args.seccomp_count else None
    if seccomp:
        summary["seccomp"] = seccomp
    summary["den_vs_podman"] = ratio
    Console().print(table)
    if seccomp:
        sc = Table(title="seccomp profile on vs off (same run, turn about)")
        for col in ("step", "on p50 ms", "off p50 ms", "on p90 ms", "off p90 ms", "slower %"):
            sc.add_column(col, justify="right")
        for step, r in seccomp.items():
            sc.add_row(
                step,
                *(str(r[k]) for k in ("on_p50_ms", "off_p50_ms", "on_p90_ms", "off_p90_ms")),
                str(r["slower_pct"]),
            )
        Console().print(sc)
    Console().print(
        f"den/podman create->exec: {ratio}   idle memory per workspace: "
        f"{summary['idle_memory_bytes'] / 1024:.0f} KiB   create #1-5 vs #{args.scale - 4}-{args.scale}:"
        f" {first:.1f} ms vs {last:.1f} ms"
    )
    goals = {
        "create_exec_p50_lt_50ms": summary["create_exec"]["p50_ms"] < 50,
        "den_vs_podman_le_0.3": ratio is not None and ratio <= 0.3,
        "nth_within_20pct": last <= first * 1.2,
        "seccomp_le_5pct_slower": seccomp is None
        or all(r["slower_pct"] <= 5 for r in seccomp.values()),
    }
    print(json.dumps({"bench": "lifecycle", "results": summary, "goals": goals}))


if __name__ == "__main__":
    main()
