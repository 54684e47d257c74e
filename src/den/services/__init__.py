"""Services: each module registers its methods with the registry on import."""

from __future__ import annotations

import importlib

MODULES = (
    "system",
    "users",
    "keys",
    "tokens",
    "audit",
    "workspaces",
    "power",
    "compute",
    "vm",
    "code",
    "images",
    "jobs",
    "metrics",
    "idle",
    "sessions",
    "egress",
    "weblogin",
    "sharing",
    "domains",
    "webca",
    "ui",
    "llm",
    "execstream",
    "mail",
    "envvars",
    "why",
    "net",
    "vol",
    "acl",
)


def load_all() -> None:
    """Import every service module so that all methods are registered."""
    for name in MODULES:
        importlib.import_module(f"den.services.{name}")
    importlib.import_module("den.rpc.openrpc")
