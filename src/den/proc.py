"""The one way den runs a host command: logged, timed, typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from den.errors import BackendFailure

log = logging.getLogger(__name__)


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class CommandFailed(BackendFailure):
    """A host command exited non-zero (or could not start)."""

    def __init__(self, result: Result, message: str | None = None) -> None:
        err = result.stderr.strip() or result.stdout.strip()
        super().__init__(
            message or f"{result.argv[0]} failed (exit {result.returncode}): {err[-500:]}",
            log_detail=f"argv={result.argv!r}",
        )
        self.result = result


async def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: bytes | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> Result:
    """Run ``argv`` (never through a shell) and return its result.

    Raises :class:`CommandFailed` when ``check`` and the exit code is not 0, or
    when the program is missing or exceeds ``timeout``.
    """
    args = [str(a) for a in argv]
    start = time.perf_counter()
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except FileNotFoundError as exc:
        res = Result(args, 127, "", f"{args[0]}: not installed ({exc})", 0.0)
        raise CommandFailed(res, f"{args[0]} is not installed; run `den init`") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        res = Result(args, -9, "", "timed out", time.perf_counter() - start)
        raise CommandFailed(res, f"{args[0]} timed out after {timeout:.0f}s") from None
    res = Result(
        args,
        proc.returncode if proc.returncode is not None else -1,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
        time.perf_counter() - start,
    )
    log.debug(
        "ran %s",
        " ".join(args),
        extra={"ctx": {"rc": res.returncode, "ms": round(res.seconds * 1e3, 1)}},
    )
    if check and res.returncode != 0:
        raise CommandFailed(res)
    return res
