"""The OpenRPC 1.3 document, generated from the registry, and ``rpc.discover``."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from den import __version__
from den.errors import ERROR_CLASSES
from den.rpc import acl
from den.rpc.registry import REGISTRY, Cli, Context, Method, NoParams, Registry, Right, method

REF = "#/components/schemas/{model}"


def _schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(tp).json_schema(ref_template=REF, mode="serialization")
    defs.update(schema.pop("$defs", {}))
    return schema


def _params(m: Method, defs: dict[str, Any]) -> list[dict[str, Any]]:
    schema = m.params.model_json_schema(ref_template=REF)
    defs.update(schema.pop("$defs", {}))
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema.get("properties", {}).items():
        desc = prop.get("description", "")
        out.append(
            {
                "name": name,
                "required": name in required,
                "schema": prop,
                **({"description": desc} if desc else {}),
            }
        )
    return out


def _errors() -> list[dict[str, Any]]:
    return [
        {"code": cls.code, "message": cls.kind.replace("_", " ")}
        for cls in ERROR_CLASSES
        if cls.code > -32100
    ]


def document(registry: Registry = REGISTRY) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    methods = []
    for m in sorted(registry.methods.values(), key=lambda m: m.name):
        methods.append(
            {
                "name": m.name,
                "summary": m.summary,
                "description": f"{m.doc}\n\nRequired right: {m.right.name}.{acl.discover_note(m)}",
                "paramStructure": "either",
                "params": _params(m, defs),
                "result": {"name": "result", "schema": _schema(m.result, defs)},
                "errors": _errors(),
                "x-right": m.right.name,
                "x-mutating": m.mutating,
                "x-acl": acl.discover_entry(m),  # node methods: the ACL patterns that grant them
            }
        )
    return {
        "openrpc": "1.3.2",
        "info": {
            "title": "den",
            "version": __version__,
            "description": "den's API: every method of the registry. Errors are listed in den.errors.",
        },
        "methods": methods,
        "components": {"schemas": defs},
    }


_cached: dict[str, Any] | None = None


@method("rpc.discover", right=Right.public, cli=Cli("discover"))
async def discover(ctx: Context, p: NoParams) -> dict[str, Any]:
    """Return the OpenRPC 1.3 document describing every method of this daemon."""
    global _cached
    if _cached is None:
        _cached = document()
    return _cached
