"""The backends den knows, by the name a workspace record keeps (``ws.backend``).

Each is imported only when first made: a daemon that runs no microVM never
loads QEMU's client, and nothing outside ``den.backends`` names a concrete
backend module.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from den.errors import InvalidParams

if TYPE_CHECKING:
    from den.backends.base import Backend, HostContext
    from den.backends.seccomp import Filter
    from den.config import Settings

# name -> "module:Class"
BACKENDS: dict[str, str] = {
    "sandbox": "den.backends.sandbox:SandboxBackend",
    "microvm": "den.backends.microvm.backend:MicroVMBackend",
}


# name -> the module with what `den init` does for that backend on this host
# (guest kernels, probes): ``init_check(settings, probe) -> (checks, notes)`` and
# ``async init_prepare(settings, say) -> notes``, used when ``enabled(settings)``.
HOST_STEPS: dict[str, str] = {
    "microvm": "den.backends.microvm.assets",
}


def host_steps(settings: Settings) -> list[ModuleType]:
    """The `den init` steps of every backend enabled in ``settings``."""
    found = []
    for name in names():
        target = HOST_STEPS.get(name)
        if target is None:
            continue
        module = importlib.import_module(target)
        if module.enabled(settings):
            found.append(module)
    return found


def unavailable(name: str, settings: Settings) -> str | None:
    """None when workspaces of backend ``name`` can start on this node, else why
    not and what to do (cheap: asked on every workspace.create)."""
    target = HOST_STEPS.get(name)
    if target is None:
        return None
    reason: str | None = importlib.import_module(target).unavailable(settings)
    return reason


def names() -> list[str]:
    """Every backend's name, in a stable order."""
    return sorted(BACKENDS)


def backend_class(name: str) -> type[Backend]:
    """The class of backend ``name`` (InvalidParams naming the known ones)."""
    target = BACKENDS.get(name)
    if target is None:
        known = ", ".join(names())
        raise InvalidParams(f"no backend {name!r} (den has: {known})", field="backend")
    module, _, cls = target.partition(":")
    found: type[Backend] = getattr(importlib.import_module(module), cls)
    return found


def make(name: str, host: HostContext) -> Backend:
    """A new backend ``name`` on ``host``."""
    return backend_class(name)(host)


def seccomp_filter() -> Filter:
    """The workspaces' syscall filter, read and checked (a broken profile raises):
    what the daemon puts in every :class:`HostContext` when sandbox_seccomp is on."""
    from den.backends import seccomp

    return seccomp.prepare()
