"""Logging with context (``method=``, ``user=``, ``ws=``) and no secrets.

Call sites pass context as ``extra={"ctx": {...}}``; the formatter appends it
as ``key=value`` pairs. A filter masks anything that looks like a den token
or a key=value secret, so a secret that slips into a message never reaches
the log.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

SECRET_KEYS = re.compile(r"(password|passphrase|secret|token|private_key|authorization)", re.I)
_TOKEN_RE = re.compile(r"den_[A-Za-z0-9]+_[A-Za-z0-9_\-]{16,}")
_KV_SECRET_RE = re.compile(
    r"((?:password|passphrase|secret|token|authorization)[\"']?\s*[:=]\s*[\"']?)([^\s\"',}]+)", re.I
)

# Credentials in a URL: an http(s) user part (often a token) and any password.
_URL_CRED_RE = re.compile(r"(?i)\b(https?://|[a-z][a-z0-9+.-]*://[^\s/@:]*:)[^\s/@]*@")


def redact_text(text: str) -> str:
    text = _TOKEN_RE.sub("den_***", text)
    text = _URL_CRED_RE.sub(r"\1***@", text)
    return _KV_SECRET_RE.sub(r"\1***", text)


def redact(value: Any) -> Any:
    """Return a copy of a JSON-like value with secret-named fields masked."""
    if isinstance(value, dict):
        return {
            k: ("***" if isinstance(k, str) and SECRET_KEYS.search(k) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


# Fields that carry a command's input (workspace.exec and any method named
# alike): anyone's secrets may be in them, so only their shape is kept.
INPUT_FIELDS = frozenset({"argv", "env", "stdin"})
_PROGRAM_RE = re.compile(r"[A-Za-z0-9_./+-]{1,64}")


def _size(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return f"<{len(text.encode(errors='replace'))} bytes>"


def input_shapes(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with command input reduced to names and lengths.

    ``env`` keeps its variable names, ``stdin`` becomes its length, ``argv``
    keeps the program name (argv[0], when it looks like one) and the length
    of every argument.
    """
    out = dict(params)
    for key in INPUT_FIELDS & out.keys():
        value = out[key]
        if key == "env" and isinstance(value, dict):
            out[key] = {str(k)[:64]: _size(v) for k, v in list(value.items())[:100]}
        elif key == "argv" and isinstance(value, list):
            head = value[:1]
            shown = [
                h if isinstance(h, str) and _PROGRAM_RE.fullmatch(h) else _size(h) for h in head
            ]
            out[key] = shown + [_size(v) for v in value[1:100]]
        else:
            out[key] = _size(value)
    return out


class ContextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = getattr(record, "ctx", None)
        if ctx:
            base += " " + " ".join(f"{k}={v}" for k, v in ctx.items() if v is not None)
        return redact_text(base)


def setup(level: str = "info", log_file: Path | None = None) -> None:
    fmt = ContextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level.upper())
    # aiohttp's access log adds nothing our own call log does not have.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Their debug lines carry SQL parameters (exec stdin, for one): never log them.
    for noisy in ("aiosqlite", "sqlalchemy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class timed:
    """Log how long a block took, at debug level: ``with timed("snapshot", ws=id):``."""

    def __init__(self, what: str, **ctx: object) -> None:
        self.what = what
        self.ctx = ctx

    def __enter__(self) -> timed:
        import time

        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import time

        ms = round((time.perf_counter() - self.start) * 1e3, 2)
        logging.getLogger("den.timing").debug(self.what, extra={"ctx": {**self.ctx, "ms": ms}})
