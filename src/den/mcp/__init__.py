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
