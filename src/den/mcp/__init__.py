"""den as an MCP server (the official ``mcp`` SDK's low-level ``Server``).

The tools are den's method registry as the caller may call it (same names, the
params models' JSON Schemas, the docstrings), and every call goes through
``REGISTRY.call``: rights, validation and audit live there once. Three tools
are MCP's own: streaming exec, and reading and writing a file inside a
workspace (an exec of ``cat``/``sh`` in it, through ``workspace.exec``).

Transports (den.mcp.http): streamable HTTP at ``/mcp`` on den's HTTP listener
and through Caddy, and, on the unix socket only, the same JSON-RPC lines as
stdio over a websocket, which ``den mcp`` (den.mcp.stdio) relays from its
stdin and stdout.
"""

from __future__ import annotations

import asyncio
import importlib
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

# The MCP SDK takes about a second of CPU to import: a daemon that is never asked
# for MCP never pays it, and the first request imports it in a thread, so the
# event loop keeps serving everyone else meanwhile.
_http: ModuleType | None = None


async def _http_module() -> ModuleType:
    global _http
    if _http is None:  # two first requests at once: Python's import lock makes one wait
        _http = await asyncio.to_thread(importlib.import_module, "den.mcp.http")
    return _http


async def handler(request: web.Request) -> web.StreamResponse:
    """``/mcp`` on den's own listeners (den.mcp.http.handler)."""
    http = await _http_module()
    response: web.StreamResponse = await http.handler(request)
    return response


async def caddy_handler(request: web.Request) -> web.StreamResponse:
    """``/mcp`` at den's domain, through Caddy (den.mcp.http.caddy_handler)."""
    http = await _http_module()
    response: web.StreamResponse = await http.caddy_handler(request)
    return response
