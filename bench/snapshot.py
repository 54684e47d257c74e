"""Benchmark: btrfs snapshots of a code tree, beside a full copy.

In a loopback btrfs pool of its own (removed on exit, even on failure) it
generates a code tree of ~400 MB and one of ~4 GB of many files, then times:

- a snapshot of each (libbtrfsutil, as den does; median of ``--runs``),
- ``cp -a --reflink=never`` of the small tree (plus sync), and a reflink copy,
- the same snapshots (and their deletes) with simple quotas on, as den makes
  them: each snapshot joins a level-1 qgroup with a limit (den's disk limits),
- the same again with full qgroups (what den used before simple quotas).

Goal: a snapshot under 10 ms at both sizes with quotas off, and den's disk
limits (simple quotas) within 10% of that. Prints a table and one JSON line.

    .venv/bin/python bench/snapshot.py [--runs 20] [--small-mb 400] [--large-mb 4000]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from den.storage import btrfs

GOAL_MS = 10.0
console = Console(stderr=True)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_pool(size_gb: int, where: str | None) -> Iterator[Path]:
    """A mounted btrfs filesystem on a sparse loop image; everything removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="den-bench-snap-", dir=where))
    img, mnt = base / "pool.img", base / "mnt"
    dev = ""
    mounted = False
    try:
        mnt.mkdir()
        sh("truncate", "-s", f"{size_gb}G", str(img))
        dev = sh("losetup", "--find", "--show", str(img))
        sh("mkfs.btrfs", "-q", dev)
        sh("mount", "-t", "btrfs", dev, str(mnt))
        mounted = True
        yield mnt
    finally:
        if mounted:
            res = subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
            if res.returncode != 0:
                subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True, check=False)
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def generate(root: Path, total_mb: int, files: int, seed: int) -> dict[str, int]:
    """Fill subvolume ``root`` with ``files`` files of random content, ~``total_mb`` in all."""
    btrfs.create_subvolume(root)
    rng = random.Random(seed)
    buf = os.urandom(1 << 20)
    avg = (total_mb << 20) // files
    written = 0
    d = root
    for i in range(files):
        if i % 200 == 0:
            d = root / f"pkg{i // 5000:02d}" / f"mod{i // 200:04d}"
            d.mkdir(parents=True)
        size = min(rng.randint(avg // 4, avg * 7 // 4), len(buf))
        fd = os.open(d / f"f{i:06d}.py", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            off = rng.randrange(0, len(buf) - size + 1)
            os.write(fd, buf[off : off + size])
        finally:
            os.close(fd)
        written += size
    return {"files": files, "bytes": written}


def fs_sync(mnt: Path) -> None:
    sh("btrfs", "filesystem", "sync", str(mnt))


def time_snapshots(mnt: Path, src: Path, runs: int, limited: bool = False) -> dict[str, Any]:
    """Milliseconds per snapshot of ``src`` and per delete: back to back, then each
    right after deleting the previous one (workspaces come and go; btrfs cleans deleted
    snapshots in the background, and with qgroups that cleaning is what costs).

    ``limited``: each snapshot joins a level-1 qgroup of its own with a 10G limit,
    as den's workspaces do (simple quotas must be on)."""
    fs_sync(mnt)
    dsts = [mnt / f"snap-{src.name}-{i}" for i in range(runs)]
    made, deleted, churn = [], [], []

    def make(i: int, dst: Path) -> None:
        if limited:
            group = btrfs.workspace_qgroup(f"{i:012x}")
            btrfs.qgroup_create(mnt, group)
            btrfs.qgroup_limit(mnt, group, 10 << 30)
            btrfs.snapshot_into(src, dst, group)
        else:
            btrfs.snapshot(src, dst)

    for i, dst in enumerate(dsts):
        t0 = time.perf_counter()
        make(i, dst)
        made.append((time.perf_counter() - t0) * 1e3)
    for dst in dsts:
        t0 = time.perf_counter()
        btrfs.delete_subvolume(dst)
        deleted.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    fs_sync(mnt)  # commits the deletions, which wakes the cleaner
    sh("btrfs", "subvolume", "sync", str(mnt))
    cleanup = time.perf_counter() - t0
    for i, dst in enumerate(dsts):
        t0 = time.perf_counter()
        make(i, dst)
        churn.append((time.perf_counter() - t0) * 1e3)
        btrfs.delete_subvolume(dst)
    fs_sync(mnt)
    sh("btrfs", "subvolume", "sync", str(mnt))
    if limited:
        for i in range(runs):
            btrfs.qgroup_destroy(mnt, btrfs.workspace_qgroup(f"{i:012x}"))
    return {
        "made": made,
        "deleted": deleted,
        "churn": churn,
        "cleanup_s": round(cleanup, 2),
    }


def time_copies(mnt: Path, src: Path, runs: int, reflink: str) -> list[float]:
    """Milliseconds per ``cp -a --reflink=...`` of ``src``, synced to disk."""
    out = []
    for i in range(runs):
        holder = mnt / f"copy-{reflink}-{i}"
        btrfs.create_subvolume(holder)
        fs_sync(mnt)
        t0 = time.perf_counter()
        subprocess.run(
            ["cp", "-a", f"--reflink={reflink}", str(src), str(holder / "tree")], check=True
        )
        fs_sync(mnt)
        out.append((time.perf_counter() - t0) * 1e3)
        btrfs.delete_subvolume(holder)
        fs_sync(mnt)
    return out


def summary(case: str, tree: str, samples: list[float]) -> dict[str, Any]:
    return {
        "case": case,
        "tree": tree,
        "runs": len(samples),
        "median_ms": round(statistics.median(samples), 2),
        "min_ms": round(min(samples), 2),
        "max_ms": round(max(samples), 2),
    }


def step(what: str, fn: Callable[[], Any]) -> Any:
    console.print(f"[cyan]->[/cyan] {what}", highlight=False)
    t0 = time.perf_counter()
    result = fn()
    console.print(f"   {time.perf_counter() - t0:.1f}s", highlight=False)
    return result


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup of the pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="Snapshots per case (median of these).")
    ap.add_argument("--cp-runs", type=int, default=3, help="Full copies of the small tree.")
    ap.add_argument("--small-mb", type=int, default=400, help="Size of the small tree in MB.")
    ap.add_argument("--small-files", type=int, default=20000, help="Files in the small tree.")
    ap.add_argument("--large-mb", type=int, default=4000, help="Size of the large tree in MB.")
    ap.add_argument("--large-files", type=int, default=40000, help="Files in the large tree.")
    ap.add_argument("--no-qgroups", action="store_true", help="Skip the runs with quotas on.")
    ap.add_argument("--dir", default=None, help="Where to put the loop image (default: TMPDIR).")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/snapshot.py needs root (loop devices, mount)")
    if not btrfs.available():
        sys.exit("python3-btrfsutil is not importable: run `make deps`")
    signal.signal(signal.SIGTERM, _stop)
    size_gb = (args.small_mb * 2 + args.large_mb) // 1024 + 4
    rows: list[dict[str, Any]] = []
    trees: dict[str, dict[str, int]] = {}
    cleanup: dict[str, float] = {}
    with loop_pool(size_gb, args.dir) as mnt:
        small, large = mnt / "small", mnt / "large"
        trees["small"] = step(
            f"generating {args.small_mb} MB in {args.small_files} files",
            lambda: generate(small, args.small_mb, args.small_files, 1),
        )
        trees["large"] = step(
            f"generating {args.large_mb} MB in {args.large_files} files",
            lambda: generate(large, args.large_mb, args.large_files, 2),
        )
        step("syncing", lambda: fs_sync(mnt))
        for name, src in (("small", small), ("large", large)):
            res = step(
                f"{args.runs} snapshots of the {name} tree, twice",
                functools.partial(time_snapshots, mnt, src, args.runs),
            )
            rows.append(summary("snapshot", name, res["made"]))
            rows.append(summary("delete", name, res["deleted"]))
            rows.append(summary("snapshot amid deletes", name, res["churn"]))
            cleanup[name] = res["cleanup_s"]
        samples = step(
            f"{args.cp_runs} x cp -a --reflink=never of the small tree",
            lambda: time_copies(mnt, small, args.cp_runs, "never"),
        )
        rows.append(summary("cp -a --reflink=never, sync", "small", samples))
        samples = step(
            f"{args.cp_runs} x cp -a --reflink=always of the small tree",
            lambda: time_copies(mnt, small, args.cp_runs, "always"),
        )
        rows.append(summary("cp -a --reflink=always, sync", "small", samples))
        if not args.no_qgroups:
            step("enabling simple quotas", lambda: btrfs.quota_enable(mnt))
            for name, src in (("small", small), ("large", large)):
                res = step(
                    f"{args.runs} limited snapshots of the {name} tree, simple quotas, twice",
                    functools.partial(time_snapshots, mnt, src, args.runs, True),
                )
                rows.append(summary("snapshot +squota limit", name, res["made"]))
                rows.append(summary("delete +squota limit", name, res["deleted"]))
                rows.append(summary("snapshot amid deletes +squota limit", name, res["churn"]))
                cleanup[f"{name}_squota"] = res["cleanup_s"]
            step(
                "switching to full qgroups (and waiting for the rescan)",
                lambda: (
                    sh("btrfs", "quota", "disable", str(mnt)),
                    sh("btrfs", "quota", "enable", str(mnt)),
                    sh("btrfs", "quota", "rescan", "-w", str(mnt)),
                ),
            )
            for name, src in (("small", small), ("large", large)):
                res = step(
                    f"{args.runs} snapshots of the {name} tree, qgroups on, twice",
                    functools.partial(time_snapshots, mnt, src, args.runs),
                )
                rows.append(summary("snapshot +qgroups", name, res["made"]))
                rows.append(summary("delete +qgroups", name, res["deleted"]))
                rows.append(summary("snapshot amid deletes +qgroups", name, res["churn"]))
                cleanup[f"{name}_qgroups"] = res["cleanup_s"]

    caption = "; ".join(
        f"{k}: {t['bytes'] / 1e6:.0f} MB in {t['files']} files" for k, t in trees.items()
    )
    table = Table(title="btrfs snapshot of a code tree", caption=caption, header_style="bold")
    for col in ("case", "tree", "runs", "median ms", "min ms", "max ms"):
        table.add_column(col, justify="left" if col in ("case", "tree") else "right")
    for r in rows:
        table.add_row(
            r["case"],
            r["tree"],
            str(r["runs"]),
            f"{r['median_ms']:.2f}",
            f"{r['min_ms']:.2f}",
            f"{r['max_ms']:.2f}",
        )
    Console().print(table)
    plain = [r for r in rows if r["case"].startswith("snapshot") and "+" not in r["case"]]
    goal = all(r["median_ms"] < GOAL_MS for r in plain)
    by = {(r["case"], r["tree"]): r["median_ms"] for r in rows}
    # den's disk limits against no quotas, per tree: snapshot and delete, in the same run.
    limits_cost = {
        f"{case}_{tree}": round(by[(f"{case} +squota limit", tree)] / by[(case, tree)], 2)
        for case in ("snapshot", "delete")
        for tree in trees
        if (f"{case} +squota limit", tree) in by and by[(case, tree)] > 0
    }
    print(
        json.dumps(
            {
                "bench": "snapshot",
                "kernel": platform.release(),
                "trees": trees,
                "results": rows,
                "cleanup_of_deleted_snapshots_s": cleanup,
                "goal_ms": GOAL_MS,
                "goal_met": goal,
                "squota_over_plain": limits_cost,
            }
        )
    )


if __name__ == "__main__":
    main()
