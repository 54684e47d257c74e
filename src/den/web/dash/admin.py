"""The admin pages under /admin: node stats, users, every workspace, live sessions,
images, jobs, the audit log, the UI allow-list and per-workspace metric charts.

A signed-in member gets the same 404 as an unknown address on every one of them
(``signed_in(request, admin=True)``); the registry checks the right again on each call.
Every fact comes from a registered method, and every control posts to one.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from den.errors import DenError
from den.web.dash import charts
from den.web.dash.base import Browser, _not_found, call, render, signed_in
from den.web.dash.do import message

# The metrics page's windows: about 240 points each at most (samples come every 5 s).
WINDOWS = {"15m": (900, "last 15 min"), "1h": (3600, "last hour"),
           "6h": (21600, "last 6 hours"), "24h": (86400, "last 24 hours")}  # fmt: skip
POINTS = 240
AUDIT_FILTERS = ("actor", "target", "method", "outcome", "since")
OUTCOMES = (
    "ok",
    "invalid_params",
    "not_found",
    "forbidden",
    "conflict",
    "quota_exceeded",
    "backend_failure",
    "internal",
)
MIB = 1 << 20


async def _try(b: Browser, method: str, params: dict[str, Any], default: Any) -> Any:
    try:
        return await call(b, method, params)
    except DenError:
        return default


async def overview(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    stats = await call(b, "stats", {})
    jobs = await _try(b, "job.list", {}, [])
    running = [j for j in jobs if j["state"] == "running"]
    return render(
        request, "admin.html", b=b, title="Admin", stats=stats, jobs=running,
        info=await _try(b, "system.info", {}, None),
    )  # fmt: skip


async def node(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    return render(
        request, "admin_node.html", b=b, title="Node", info=await call(b, "system.info", {}),
        stats=await call(b, "stats", {}),
    )  # fmt: skip


async def users(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    rows = await call(b, "user.list", {})
    return render(request, "admin_users.html", b=b, title="Users", users=rows)


async def user(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    name = request.match_info["name"]
    try:
        row = await call(b, "user.get", {"name": name})
    except DenError:
        raise _not_found() from None
    keys = await _try(b, "key.list", {"user": name}, [])
    return render(
        request, "admin_user.html", b=b, title=f"User {name}", user=row, keys=keys,
        next=f"/admin/users/{name}",
    )  # fmt: skip


async def workspaces(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    rows = await call(b, "workspace.list", {"all": True})
    return render(
        request, "admin_workspaces.html", b=b, title="All workspaces", workspaces=rows,
        live="workspace", live_all=True,
    )  # fmt: skip


async def sessions(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    rows = await call(b, "session.list", {})
    return render(
        request, "admin_sessions.html", b=b, title="Live sessions", sessions=rows,
        live="session", live_all=True,
    )  # fmt: skip


async def images(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    rows = await call(b, "image.list", {})
    jobs = [j for j in await call(b, "job.list", {}) if j["kind"].startswith("image.")]
    return render(
        request, "admin_images.html", b=b, title="Images", images=rows, jobs=jobs,
        request_path="/admin/images", live="job", live_all=True,
    )  # fmt: skip


async def jobs(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    rows = await call(b, "job.list", {})
    return render(
        request, "admin_jobs.html", b=b, title="Jobs", jobs=rows, request_path="/admin/jobs",
        live="job", live_all=True,
    )  # fmt: skip


async def audit(request: web.Request) -> web.Response:
    """The audit log; the filters are a GET form (reading changes nothing)."""
    b = await signed_in(request, admin=True)
    q = request.query
    filters = {k: q[k].strip() for k in AUDIT_FILTERS if q.get(k, "").strip()}
    params: dict[str, Any] = dict(filters)
    limit = q.get("limit", "").strip()
    params["limit"] = limit or "100"
    error = ""
    try:
        rows = await call(b, "audit.list", params)
    except DenError as err:  # a bad filter: the registry's words, and no rows
        rows, error = [], message(err)
    return render(
        request, "admin_audit.html", b=b, title="Audit log", events=rows, f=filters,
        limit=params["limit"], error=error, outcomes=OUTCOMES,
    )  # fmt: skip


async def ui(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    rows = await call(b, "ui.list", {})
    return render(request, "admin_ui.html", b=b, title="UI access", entries=rows)


# -- metric charts ------------------------------------------------------------------------------


def _at(value: str) -> datetime:
    at = datetime.fromisoformat(value)
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _rates(points: list[dict[str, Any]], field: str) -> list[tuple[datetime, float]]:
    """Bytes per second between neighbouring samples of a counter (a reset counts 0)."""
    out: list[tuple[datetime, float]] = []
    for prev, cur in itertools.pairwise(points):
        dt = (_at(cur["at"]) - _at(prev["at"])).total_seconds()
        if dt > 0:
            out.append((_at(cur["at"]), max(0.0, (cur[field] - prev[field]) / dt)))
    return out


def metric_charts(points: list[dict[str, Any]], start: datetime, end: datetime) -> list[Any]:
    """CPU, memory and network charts of ``points`` (workspace.metrics' result)."""
    # A point's cpu_cores is the use since the one before: the first has none.
    cpu = [(_at(p["at"]), float(p["cpu_cores"])) for p in points[1:]]
    mem = [(_at(p["at"]), p["memory_bytes"] / MIB) for p in points]
    S = charts.Series
    return [
        charts.line_chart("CPU (cores)", [S("cores", cpu)], start, end, charts.cores, "cpu"),
        charts.line_chart("Memory", [S("memory", mem)], start, end, charts.mib, "memory"),
        charts.line_chart(
            "Network",
            [S("received", _rates(points, "net_rx_bytes")),
             S("sent", _rates(points, "net_tx_bytes"))],
            start, end, charts.rate, "network",
        ),
    ]  # fmt: skip


async def metrics(request: web.Request) -> web.Response:
    b = await signed_in(request, admin=True)
    ref = f"{request.match_info['owner']}/{request.match_info['name']}"
    window = request.query.get("window", "1h")
    if window not in WINDOWS:
        window = "1h"
    seconds = WINDOWS[window][0]
    step = seconds // POINTS if seconds > 3600 else 0
    try:
        ws = await call(b, "workspace.get", {"ref": ref})
        points = await call(b, "workspace.metrics", {"ref": ref, "since": window, "step": step})
    except DenError:  # not there, or not a workspace's name at all: 404 either way
        raise _not_found() from None
    end = datetime.now(UTC)
    start = end - timedelta(seconds=seconds)
    return render(
        request, "admin_metrics.html", b=b, title=f"Metrics of {ref}", ws=ws, ref=ref,
        window=window, windows=WINDOWS, charts=metric_charts(points, start, end),
        samples=len(points), last=points[-1] if points else None,
    )  # fmt: skip


def add_routes(router: web.UrlDispatcher, prefix: str) -> None:
    for path, handler in (
        ("/admin", overview), ("/admin/node", node), ("/admin/users", users),
        ("/admin/users/{name}", user), ("/admin/workspaces", workspaces),
        ("/admin/sessions", sessions), ("/admin/images", images), ("/admin/jobs", jobs),
        ("/admin/audit", audit), ("/admin/ui", ui), ("/admin/metrics/{owner}/{name}", metrics),
    ):  # fmt: skip
        router.add_get(prefix + path, handler)
