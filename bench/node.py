"""Benchmark: the node API's reads over den's unix socket beside the commands they replace.

N calls each (default 200, after a warm-up), taken in turn so that the machine's
load falls on all alike: latency p50/p99 (ms) of

- den, JSON-RPC over the unix socket (one persistent client in this process):
  net.interfaces, net.routes, vol.list_mounts, vol.inventory;
- den's floor: rpc.health, a call that does nothing;
- the equivalent command as a process, its JSON output read whole:
  `ip -j addr`, `ip -j route`, `findmnt -J`, and `lsblk -J -f` for the inventory.

The goal: each read method faster than its command. Prints a table and one JSON
line. Needs root; makes its own daemon (no pool, no workspaces) and removes it.
``--base REV`` also runs a daemon of den's source at git revision REV beside it
(rows "base ..."), so that a change is measured under the same load.

    .venv/bin/python bench/node.py [--count 200] [--base REV]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

from _daemon import BenchDaemon
from den.cli.client import Client

PAIRS = (
    ("net.interfaces", ["ip", "-j", "addr"]),
    ("net.routes", ["ip", "-j", "route"]),
    ("vol.list_mounts", ["findmnt", "-J"]),
    ("vol.inventory", ["lsblk", "-J", "-f"]),
)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def command(argv: list[str]) -> Callable[[], object]:
    def go() -> object:
        out = subprocess.run(argv, capture_output=True, check=True).stdout
        return json.loads(out)

    return go


def rpc(c: Client, meth: str) -> Callable[[], object]:
    def go() -> object:
        return c.call(meth, {})

    return go


@contextlib.contextmanager
def base_source(rev: str | None) -> Iterator[dict[str, str]]:
    """Environment that makes a daemon run den's source at git revision ``rev``
    (exported to a temporary directory, first on its PYTHONPATH); {} for none."""
    if rev is None:
        yield {}
        return
    root = Path(__file__).resolve().parent.parent
    tar = subprocess.run(
        ["git", "-C", str(root), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    tmp = Path(tempfile.mkdtemp(prefix="den-bench-base-"))
    try:
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
        yield {"PYTHONPATH": str(tmp / "src")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--base", metavar="REV", help="also measure den at this git revision")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    # No microVM backend: the reads need none, and its assets take minutes to build.
    env = {"DEN_MICROVM": "false"}
    with contextlib.ExitStack() as stack:
        daemons = {"den": stack.enter_context(BenchDaemon(extra_env=env))}
        base_env = stack.enter_context(base_source(args.base))
        if base_env:
            daemons["base"] = stack.enter_context(BenchDaemon(extra_env={**env, **base_env}))
        clients = {k: Client(socket_path=str(d.socket), timeout=60) for k, d in daemons.items()}
        for c in clients.values():
            stack.callback(c.close)
        # The floor of any call: a public method that does nothing.
        ways: dict[str, Callable[[], object]] = {
            f"{k} rpc.health": rpc(c, "rpc.health") for k, c in clients.items()
        }
        for meth, argv in PAIRS:
            for k, c in clients.items():
                ways[f"{k} {meth}"] = rpc(c, meth)
            ways[" ".join(argv)] = command(argv)
        for fn in ways.values():
            fn()  # warm-up: imports, caches, the socket's first connection
        samples: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.count):
            for way, fn in ways.items():
                samples[way].append(timed(fn))
    table = Table(title=f"node reads, ms (n={args.count} each)")
    for col in ("way", "p50", "p99"):
        table.add_column(col, justify="left" if col == "way" else "right")
    summary: dict[str, dict[str, float]] = {}
    for way, vals in samples.items():
        summary[way] = {"p50": pct(vals, 0.5), "p99": pct(vals, 0.99)}
        table.add_row(way, f"{summary[way]['p50']:.2f}", f"{summary[way]['p99']:.2f}")
    Console().print(table)
    faster = {
        meth: summary[f"den {meth}"]["p50"] < summary[" ".join(argv)]["p50"] for meth, argv in PAIRS
    }
    print(json.dumps({"bench": "node", "count": args.count, "ms": summary, "faster": faster}))


if __name__ == "__main__":
    main()
