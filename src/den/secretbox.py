"""Secrets den must read back (environment values, provider keys, relay
passwords), sealed at rest with AES-256-GCM.

The key is 32 random bytes in ``DATA_DIR/secret.key`` (root only, made on
first use). The database alone — a copy, a backup, a dump — gives no secret
away. ``purpose`` is bound to the ciphertext as associated data, so a value
sealed for one row cannot be moved into another and opened there.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from den.errors import InternalError

KEY_FILE = "secret.key"
_PREFIX = "v1:"


def _key(data_dir: Path) -> bytes:
    path = data_dir / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            key = path.read_bytes()
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(fresh)
                f.flush()
                os.fsync(f.fileno())
            key = fresh
    if len(key) != 32:
        raise InternalError(f"{path} is not a 32-byte key; restore it from a backup")
    return key


def seal(data_dir: Path, plaintext: bytes, purpose: str) -> str:
    """``plaintext`` encrypted for storage; only :func:`unseal` with the same purpose opens it."""
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_key(data_dir)).encrypt(nonce, plaintext, purpose.encode())
    return _PREFIX + base64.b64encode(nonce + sealed).decode()


def unseal(data_dir: Path, text: str, purpose: str) -> bytes:
    if not text.startswith(_PREFIX):
        raise InternalError("a stored secret is not in den's sealed format")
    raw = base64.b64decode(text[len(_PREFIX) :])
    try:
        return AESGCM(_key(data_dir)).decrypt(raw[:12], raw[12:], purpose.encode())
    except InvalidTag:
        raise InternalError(
            f"a stored secret ({purpose}) does not open with {data_dir / KEY_FILE}: "
            "the key file was replaced or the row was altered"
        ) from None
