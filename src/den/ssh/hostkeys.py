"""The gateway's host keys: made on first start in DATA_DIR/ssh/, kept after."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncssh

KINDS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("ssh-ed25519", "ssh_host_ed25519_key", {}),
    ("ssh-rsa", "ssh_host_rsa_key", {"key_size": 3072}),
)


def key_dir(data_dir: Path) -> Path:
    return data_dir / "ssh"


def load_or_create(data_dir: Path) -> list[asyncssh.SSHKey]:
    """The host keys, generating any that is missing (private files are 0600)."""
    import asyncssh

    d = key_dir(data_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = []
    for alg, name, opts in KINDS:
        path = d / name
        if path.exists():
            keys.append(asyncssh.read_private_key(path))
            continue
        key = asyncssh.generate_private_key(alg, comment=f"den host key {alg}", **opts)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key("openssh"))
        tmp.replace(path)
        path.with_suffix(".pub").write_bytes(key.export_public_key("openssh"))
        keys.append(key)
    return keys


def fingerprints(data_dir: Path) -> list[dict[str, str]]:
    """Algorithm, SHA256 fingerprint and public key line of each host key made so far."""
    import asyncssh  # heavy: not at CLI start, where this module is imported

    out = []
    for _alg, name, _opts in KINDS:
        pub = key_dir(data_dir) / f"{name}.pub"
        if not pub.exists():
            continue
        key = asyncssh.read_public_key(pub)
        line = " ".join(key.export_public_key("openssh").decode().split()[:2])
        out.append(
            {
                "algorithm": key.get_algorithm(),
                "fingerprint": key.get_fingerprint("sha256"),
                "public_key": line,
            }
        )
    return out
