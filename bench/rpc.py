"""Benchmark: JSON-RPC over the unix socket.

Requests per second and p50/p99 latency of ``rpc.health`` and ``user.list``
(100 users), with 1 and 32 concurrent clients (keep-alive connections).
Prints a table and one JSON line.

    .venv/bin/python bench/rpc.py [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console
from rich.table import Table

from _daemon import BenchDaemon
from den.cli.client import Client


def request(method: str) -> bytes:
    body = json.dumps({"jsonrpc": "2.0", "method": method, "id": 1}).encode()
    head = (
        f"POST /rpc HTTP/1.1\r\nHost: den\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def one_client(path: str, req: bytes, until: float, lat: list[float]) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if b'"result"' not in body:
                raise RuntimeError(f"call failed: {body[:200]!r}")
    finally:
        writer.close()


async def load(path: str, method: str, clients: int, seconds: float) -> dict[str, float]:
    req = request(method)
    lat: list[float] = []
    # A short warm-up, not counted.
    await asyncio.gather(
        *(one_client(path, req, time.perf_counter() + 0.3, []) for _ in range(clients))
    )
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(one_client(path, req, until, lat) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    lat.sort()
    return {
        "method": method,
        "clients": clients,
        "requests": len(lat),
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": round(statistics.median(lat) * 1e3, 3),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1e3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0, help="Duration of each run.")
    ap.add_argument("--users", type=int, default=100, help="Users in the database for user.list.")
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with BenchDaemon() as d:
        c = Client(socket_path=str(d.socket))
        for i in range(args.users):
            c.call("user.create", {"name": f"bench{i:03d}"})
        c.close()
        rows = []
        for method in ("rpc.health", "user.list"):
            for clients in (1, 32):
                rows.append(asyncio.run(load(str(d.socket), method, clients, args.seconds)))
    table = Table(title=f"den JSON-RPC over the unix socket ({args.users} users)")
    for col in ("method", "clients", "requests", "rps", "p50_ms", "p99_ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            *(str(r[k]) for k in ("method", "clients", "requests", "rps", "p50_ms", "p99_ms"))
        )
    Console().print(table)
    health32 = next(r for r in rows if r["method"] == "rpc.health" and r["clients"] == 32)
    print(
        json.dumps(
            {
                "bench": "rpc",
                "results": rows,
                "goal": {"rpc.health@32 rps": 5000, "met": health32["rps"] >= 5000},
            }
        )
    )


if __name__ == "__main__":
    main()
