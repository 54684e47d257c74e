"""Remove every workspace an instance left on the host, whatever its database says.

For tests, benchmarks and uninstalling: containers, cgroups, idmapped views,
bundles, network namespaces, veths, the bridge and the nftables tables of one
instance. The storage pool itself is left alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path


async def purge(instance: int, data_dir: Path, subnet: str | None = None) -> list[str]:
    from den.backends import registry
    from den.backends.base import HostContext
    from den.config import Settings
    from den.net.network import Network

    net = Network(instance, subnet or f"10.{77 + instance}.0.0/16", True, [])
    host = HostContext(
        instance, data_dir, data_dir / "pool" / "volumes", net, None, Settings(instance=instance)
    )
    backends = [registry.make(name, host) for name in registry.names()]
    removed: list[str] = []
    for backend in backends:
        found = await backend.orphans(set())
        for ws_id in found:
            await backend.remove_orphan(ws_id)
        removed += found
    for name in await asyncio.to_thread(net.orphans, set()):
        await net.detach(name)
    for backend in backends:
        await backend.teardown_host()
    await net.teardown()
    return removed


def purge_sync(instance: int, data_dir: Path) -> list[str]:
    """:func:`purge` from synchronous code, also from a thread whose event loop is
    running (then in a thread of its own: a loop cannot be entered twice)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(purge(instance, data_dir))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, purge(instance, data_dir)).result()
