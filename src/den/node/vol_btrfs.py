"""btrfs for vol.*: subvolumes through libbtrfsutil, quotas through den's ioctls
(den.storage.btrfs), the rest (scrub, balance, usage) through the btrfs tool."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from den import proc
from den.errors import BackendFailure, InvalidParams
from den.storage import btrfs

try:
    import btrfsutil
except ImportError:  # pragma: no cover - reported by `den init --check`
    btrfsutil = None

_RDONLY = 1  # BTRFS_ROOT_SUBVOL_RDONLY in a subvolume's flags


def _need(path: str) -> None:
    if btrfsutil is None:
        raise BackendFailure("python3-btrfsutil is not installed; run `den init`")
    if not btrfs.is_btrfs(path):  # type: ignore[arg-type]
        raise InvalidParams(f"{path} is not on a btrfs filesystem", field="path")


def _fail(what: str, exc: Exception) -> BackendFailure:
    return BackendFailure(f"cannot {what}: {exc}")


def list_subvolumes(path: str) -> list[dict[str, Any]]:
    _need(path)
    out = []
    try:
        with btrfsutil.SubvolumeIterator(path, top=5, info=True) as it:
            for sub, info in it:
                out.append(
                    {
                        "id": info.id,
                        "path": sub,
                        "parent_id": info.parent_id,
                        "uuid": info.uuid.hex(),
                        "parent_uuid": info.parent_uuid.hex() if any(info.parent_uuid) else "",
                        "read_only": bool(info.flags & _RDONLY),
                        "generation": info.generation,
                        "created": info.otime,
                    }
                )
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail(f"list the subvolumes of {path}", exc) from None
    return out


def create_subvolume(path: str) -> dict[str, Any]:
    _need(path.rsplit("/", 1)[0] or "/")
    try:
        btrfsutil.create_subvolume(path)
        return {"path": path, "id": btrfsutil.subvolume_id(path)}
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail(f"create subvolume {path}", exc) from None


def delete_subvolume(path: str, recursive: bool) -> dict[str, Any]:
    _need(path)
    try:
        if not btrfsutil.is_subvolume(path):
            raise InvalidParams(f"{path} is not a subvolume", field="path")
        btrfsutil.delete_subvolume(path, recursive=recursive)
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail(f"delete subvolume {path}", exc) from None
    return {"path": path, "deleted": True}


def snapshot(source: str, dest: str, read_only: bool) -> dict[str, Any]:
    _need(source)
    try:
        if not btrfsutil.is_subvolume(source):
            raise InvalidParams(f"{source} is not a subvolume", field="source")
        btrfsutil.create_snapshot(source, dest, read_only=read_only)
        return {"source": source, "path": dest, "id": btrfsutil.subvolume_id(dest)}
    except btrfsutil.BtrfsUtilError as exc:
        raise _fail(f"snapshot {source} to {dest}", exc) from None


def set_quota(path: str, limit_bytes: int | None) -> dict[str, Any]:
    """Limit the subvolume at ``path`` (its level-0 qgroup), turning quotas on if off."""
    from pathlib import Path

    _need(path)
    if not btrfsutil.is_subvolume(path):
        raise InvalidParams(f"{path} is not a subvolume", field="path")
    mode = btrfs.quota_enable(Path(path))
    subvol = btrfsutil.subvolume_id(path)
    btrfs.qgroup_limit(Path(path), subvol, limit_bytes)
    return {"path": path, "qgroup": f"0/{subvol}", "limit_bytes": limit_bytes, "mode": mode}


async def tool(*args: str, timeout: float = 120.0) -> str:
    return (await proc.run(["btrfs", *args], timeout=timeout)).stdout


def _key_values(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep and k.strip() and v.strip():
            out[re.sub(r"[^a-z0-9]+", "_", k.strip().lower()).strip("_")] = v.strip()
    return out


async def scrub_start(path: str) -> dict[str, Any]:
    _need(path)
    await tool("scrub", "start", path)  # runs in the background; scrub_status follows it
    return await scrub_status(path)


async def scrub_status(path: str) -> dict[str, Any]:
    _need(path)
    res = await proc.run(["btrfs", "scrub", "status", "-R", path], check=False, timeout=30)
    if res.returncode != 0:
        raise BackendFailure(f"btrfs scrub status failed: {res.stderr.strip()[-300:]}")
    kv = _key_values(res.stdout)
    status = kv.get("status", "")
    if "no stats available" in res.stdout:
        status = "never"
    counters = {k: int(v) for k, v in kv.items() if v.isdigit()}
    return {"path": path, "status": status, "running": status == "running", **counters}


async def balance_start(path: str, usage: int | None) -> dict[str, Any]:
    _need(path)
    filters = [f"-dusage={usage}", f"-musage={usage}"] if usage is not None else ["--full-balance"]
    await tool("balance", "start", "--bg", *filters, path)
    return await balance_status(path)


async def balance_status(path: str) -> dict[str, Any]:
    _need(path)
    res = await proc.run(["btrfs", "balance", "status", path], check=False, timeout=30)
    text = (res.stdout + res.stderr).strip()
    running = "is running" in text or "is paused" in text
    if not running and "No balance found" not in text:
        raise BackendFailure(f"btrfs balance status failed: {text[-300:]}")
    return {"path": path, "running": running, "paused": "is paused" in text, "text": text}


async def defrag(path: str, recursive: bool) -> dict[str, Any]:
    _need(path)
    await tool("filesystem", "defragment", *(["-r"] if recursive else []), path, timeout=3600)
    return {"path": path, "recursive": recursive}


def _bytes(v: str) -> int | str:
    v = v.split()[0] if v.split() else v
    return int(v) if v.isdigit() else v


async def fs_usage(path: str) -> dict[str, Any]:
    """`btrfs filesystem usage -b`: the overall figures, then each block group type."""
    _need(path)
    text = await tool("filesystem", "usage", "-b", path)
    overall, _, rest = text.partition("\n\n")
    out: dict[str, Any] = {"path": path}
    out.update({k: _bytes(v) for k, v in _key_values(overall).items()})
    groups = []
    for m in re.finditer(r"^(\w+),(\w+): Size:(\d+), Used:(\d+)", rest, re.M):
        groups.append(
            {"type": m[1], "profile": m[2], "size_bytes": int(m[3]), "used_bytes": int(m[4])}
        )
    out["block_groups"] = groups
    return out


async def fs_df(path: str) -> list[dict[str, Any]]:
    _need(path)
    text = await tool("filesystem", "df", "-b", path)
    return [
        {"type": m[1], "profile": m[2], "total_bytes": int(m[3]), "used_bytes": int(m[4])}
        for m in re.finditer(r"^([\w ]+), (\w+): total=(\d+), used=(\d+)", text, re.M)
    ]


async def device_stats(path: str) -> dict[str, dict[str, int]]:
    _need(path)
    text = await tool("device", "stats", path)
    out: dict[str, dict[str, int]] = {}
    for m in re.finditer(r"^\[(.+)\]\.(\w+)\s+(\d+)$", text, re.M):
        out.setdefault(m[1], {})[m[2]] = int(m[3])
    return out


async def in_thread(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)
