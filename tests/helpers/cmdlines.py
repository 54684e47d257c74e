"""What every host user sees in ``ps``: the command lines of all host processes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path


def host_cmdlines() -> dict[int, bytes]:
    """Every host process's command line, as any host user reads it in ``ps``."""
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                out[int(p.name)] = (p / "cmdline").read_bytes()
    return out


def watch_while(
    work: Callable[[], None], seconds: float, never: bytes, not_in_crun: bytes, join: float = 60
) -> bool:
    """Run ``work`` in a thread and read every host command line for ``seconds``:
    none may hold ``never``, and ``crun exec``'s may not hold ``not_in_crun``.
    True when a ``crun exec`` was seen running meanwhile."""
    t = threading.Thread(target=work)
    t.start()
    seen = False
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for pid, cmd in host_cmdlines().items():
                assert never not in cmd, (pid, cmd)
                args = cmd.split(b"\0")
                # crun exec itself, or the reaper that runs it (crun's argv in its own):
                # detached, crun lives a moment only; the reaper, the whole session.
                if any(a.endswith(b"crun") for a in args) and b"exec" in args:
                    seen = True
                    assert not_in_crun not in cmd, cmd
            time.sleep(0.02)
    finally:
        t.join(join)
    return seen
