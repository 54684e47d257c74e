"""The one DNS label of a workspace URL, and back.

Names are ``[a-z][a-z0-9-]{0,30}``, so no separator character is free; the
readable form relies on what names cannot be instead:

* ``NAME--OWNER``: a name with no ``--`` in it. Owners start with a letter, so
  the first ``--`` followed by a letter ends the name (``a---b`` is ``a-`` of
  ``b``).
* ``PORT--NAME--OWNER`` for a published port: names start with a letter, ports
  with a digit.
* ``0--HASH`` otherwise (a name with ``--``, or a label over 63 characters):
  port 0 does not exist, so no readable label starts like this; the hash
  (130 bits of SHA-256) is looked up, never parsed.
"""

from __future__ import annotations

import base64
import hashlib

MAX_LABEL = 63
HASHED = "0--"


def label(owner: str, name: str, port: int | None = None) -> str:
    """The label of ``owner/name`` (its main URL) or of one of its published ports."""
    readable = f"{name}--{owner}" if port is None else f"{port}--{name}--{owner}"
    if "--" not in name and len(readable) <= MAX_LABEL:
        return readable
    key = f"{owner}/{name}:{port or ''}".encode()
    digest = base64.b32encode(hashlib.sha256(key).digest()).decode().lower()
    return HASHED + digest[:26]


def parse(value: str) -> tuple[str, str, int | None] | None:
    """``(owner, name, port)`` of a readable label; None for a hashed or foreign one."""
    if value.startswith(HASHED) or len(value) > MAX_LABEL:
        return None
    port: int | None = None
    rest = value
    if value[:1].isdigit():
        head, sep, rest = value.partition("--")
        if not sep or not head.isdigit() or not 0 < int(head) <= 65535 or head[0] == "0":
            return None
        port = int(head)
    for i in range(1, len(rest) - 2):
        if rest[i : i + 2] == "--" and rest[i + 2].isalpha():
            name, owner = rest[:i], rest[i + 2 :]
            return (owner, name, port) if label(owner, name, port) == value else None
    return None
