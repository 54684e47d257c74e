"""``--install``: a command's text result written into a file of the caller's.

The text goes in as one block between marker lines, so that installing again
replaces the block and leaves the rest of the file (the user's own entries)
as it was. The block is named by the text's first line (``# den 0: ...``):
each den instance has its own. The file is replaced atomically with mode
0600; a symlinked ~/.ssh/config (a dotfiles manager's) is written through.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import pwd
import re
import tempfile
from pathlib import Path

KEY_LINE = re.compile(r"^# den key: (SHA256:[A-Za-z0-9+/]+) ")


def block_name(text: str) -> str:
    first = text.splitlines()[0] if text else ""
    return first.lstrip("# ").partition(":")[0].strip() or "den"


def _fingerprint(pub: str) -> str:
    parts = pub.split()
    if len(parts) < 2:
        return ""
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return ""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def pick_identity(text: str, ssh_dir: Path) -> str | None:
    """The private key in ``ssh_dir`` whose public key is one the text names.

    As ``~/.ssh/NAME`` when that is where ssh finds it (ssh takes ``~`` from
    the password database, not from $HOME), else as an absolute path.
    """
    wanted = {m.group(1) for m in map(KEY_LINE.match, text.splitlines()) if m}
    if not wanted:
        return None
    with contextlib.suppress(OSError):
        for pub in sorted(ssh_dir.glob("*.pub")):
            private = pub.with_suffix("")
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if _fingerprint(pub.read_text()) in wanted and private.is_file():
                    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
                    if private.parent.resolve() == (home / ".ssh").resolve():
                        return f"~/.ssh/{private.name}"
                    return str(private.resolve())
    return None


def install(path: Path, text: str) -> str:
    """Write ``text`` into ``path`` as its named block; say what was done."""
    name = block_name(text)
    begin = f"# >>> {name}: written by `den ssh-config --install`; replaced on the next >>>"
    end = f"# <<< {name} <<<"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    target = Path(os.path.realpath(path))
    try:
        old = target.read_text()
    except FileNotFoundError:
        old = ""
    lines = old.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.startswith(f"# >>> {name}:")]
    stops = [i for i, ln in enumerate(lines) if ln.rstrip("\n") == end]
    if starts and stops and stops[-1] > starts[0]:
        new = "".join(lines[: starts[0]]) + block + "".join(lines[stops[-1] + 1 :])
        done = "unchanged" if new == old else "updated"
    else:
        sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
        new = old + sep + block
        done = "installed"
    if new != old:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".den-", dir=target.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return f"{done}: {name} in {path}"
