"""Benchmark: the microvm backend beside the sandbox backend, in one run of one daemon.

For each backend, N workspaces (default 5) made one after the other and then taken
through their lifecycle, all over the daemon's API: p50/p99 of create -> first exec,
suspend, resume, resume -> exec, stop, delete; memory per idle workspace (the
memory cgroup's usage, a few seconds after its first exec: for a microVM that is
QEMU, its virtiofsd and the guest memory touched). Prints which
acceleration the microVMs ran under (KVM or TCG: emulated), a table, and one JSON
line with the goals. Needs root; makes its own daemon, pool and image, and removes
them.

    .venv/bin/python bench/microvm.py [--count 5] [--mem 256M] [--backends sandbox,microvm]

Goals (issue 15): under TCG, microvm create -> first exec p50 < 4 s; on hardware KVM,
create -> first exec p50 < 500 ms and resume < 5 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

from _daemon import BenchDaemon
from den.cli.client import Client, RpcError
from lifecycle import APT, IMAGE, cgroup_memory, ensure_image, ms, pct

STEPS = ("create_exec", "suspend", "resume", "resume_exec", "stop", "delete")
TRUE = ["/bin/true"]


def run_backend(c: Client, instance: int, backend: str, count: int, mem: str) -> dict[str, Any]:
    """The lifecycle of ``count`` workspaces on ``backend``; times in ms."""
    rows: dict[str, list[float]] = {k: [] for k in STEPS}
    refs = [f"bench/{backend[:2]}{i}" for i in range(count)]
    made: list[str] = []
    accel = "n/a"
    try:
        for ref in refs:
            name = ref.split("/")[1]

            def create(name: str = name, ref: str = ref) -> None:
                c.call(
                    "workspace.create",
                    {"name": name, "user": "bench", "image": IMAGE, "backend": backend, "mem": mem},
                )
                made.append(ref)
                c.call("workspace.exec", {"ref": ref, "argv": TRUE})

            rows["create_exec"].append(ms(create))
        shown = c.call("workspace.get", {"ref": refs[0]})
        if backend == "microvm":
            accel = "tcg (emulated)" if shown.get("emulated") else "kvm"
        time.sleep(3)  # let the first exec's work settle: the idle figure
        ids = [c.call("workspace.get", {"ref": r})["id"] for r in refs]
        memory = [cgroup_memory(instance, i) for i in ids]
        for ref in refs:
            rows["suspend"].append(ms(partial(c.call, "workspace.suspend", {"ref": ref})))
        for ref in refs:
            resume = ms(partial(c.call, "workspace.resume", {"ref": ref}))
            exec_ = ms(partial(c.call, "workspace.exec", {"ref": ref, "argv": TRUE}))
            rows["resume"].append(resume)
            rows["resume_exec"].append(resume + exec_)
        for ref in refs:
            rows["stop"].append(ms(partial(c.call, "workspace.stop", {"ref": ref})))
        for ref in refs:
            rows["delete"].append(ms(partial(c.call, "workspace.delete", {"ref": ref})))
            made.remove(ref)
    finally:
        for ref in made:  # a failed run leaves nothing behind
            try:
                c.call("workspace.delete", {"ref": ref})
            except RpcError as exc:
                print(f"could not delete {ref}: {exc.message}", file=sys.stderr)
    out: dict[str, Any] = {"accel": accel}
    for step, vals in rows.items():
        out[step] = {"p50_ms": pct(vals, 0.5), "p99_ms": pct(vals, 0.99)}
    out["idle_memory_bytes"] = int(sum(memory) / len(memory)) if memory else 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=5, help="Workspaces per backend.")
    ap.add_argument("--mem", default="256M", help="Memory of each workspace (a microVM's RAM).")
    ap.add_argument(
        "--backends", default="sandbox,microvm", help="Comma-separated backends to measure."
    )
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    env = {"DEN_EGRESS": "false", "DEN_DEFAULT_DISK": "256M", "DEN_APT_CACHE": APT}
    results: dict[str, Any] = {}
    with BenchDaemon(pool_size="12G", extra_env=env) as d:
        c = Client(socket_path=str(d.socket), timeout=600)
        ensure_image(c)
        unlimited = dict.fromkeys(("max_workspaces", "max_cpu", "max_memory_mb", "max_disk_mb"), -1)
        c.call("user.create", {"name": "bench", **unlimited})
        have = c.call("info", {})["backends"]
        for backend in backends:
            if backend not in have:
                results[backend] = {"skipped": f"not enabled on this node (it has {have})"}
                continue
            try:
                results[backend] = run_backend(c, d.instance, backend, args.count, args.mem)
            except RpcError as exc:
                results[backend] = {"failed": exc.message}
        c.close()

    done = [b for b in backends if "create_exec" in results.get(b, {})]
    table = Table(title=f"den lifecycle by backend ({args.count} workspaces each, {args.mem})")
    table.add_column("step")
    for b in done:
        table.add_column(f"{b} p50 ms", justify="right")
        table.add_column(f"{b} p99 ms", justify="right")
    for step in STEPS:
        cells = []
        for b in done:
            cells += [str(results[b][step]["p50_ms"]), str(results[b][step]["p99_ms"])]
        table.add_row(step, *cells)
    mem_cells = []
    for b in done:
        mem_cells += [f"{results[b]['idle_memory_bytes'] / 2**20:.1f} MiB", ""]
    table.add_row("idle memory", *mem_cells)
    Console().print(table)
    for b in backends:
        r = results.get(b, {})
        if "create_exec" not in r:
            Console().print(f"{b}: {r.get('skipped') or r.get('failed')}")
    vm = results.get("microvm", {})
    goals: dict[str, bool | None] = {}
    if "create_exec" in vm:
        Console().print(f"microvm acceleration: {vm['accel']}")
        if vm["accel"] == "kvm":
            goals["kvm_create_exec_p50_lt_500ms"] = vm["create_exec"]["p50_ms"] < 500
            goals["kvm_resume_p50_lt_5ms"] = vm["resume"]["p50_ms"] < 5
        else:
            goals["tcg_create_exec_p50_lt_4s"] = vm["create_exec"]["p50_ms"] < 4000
    print(json.dumps({"bench": "microvm", "results": results, "goals": goals}))


if __name__ == "__main__":
    main()
