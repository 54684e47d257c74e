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
# What a block may hold: the lines ``den ssh-config`` writes, each value in
# its own strict shape. The text comes from a server (maybe a remote one, maybe
# over plain http): ProxyCommand, Match exec or LocalCommand from it would run
# on this machine at the next ssh, so anything else is refused, not written.
_WORD = r"[A-Za-z0-9._:@%+/~-]+"
_ALLOWED = re.compile(
    r"^(?:"
    r"#[^\x00-\x1f\x7f]*"
    r"|"
    r"|Host [A-Za-z0-9._-]+"
    rf"|    (?:HostName|User|IdentityFile) {_WORD}"
    r"|    (?:Port|ServerAliveInterval|ServerAliveCountMax) [0-9]{1,5}"
    r"|    (?:ForwardAgent|IdentitiesOnly) (?:yes|no)"
    r")$"
)


def check(text: str) -> None:
    """Refuse a text with any line ``den ssh-config`` would not write (ValueError)."""
    if bad := re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text):
        raise ValueError(f"the server's answer has a control character ({bad.group()!r})")
    for n, line in enumerate(text.split("\n"), 1):
        if not _ALLOWED.match(line):
            raise ValueError(
                f"line {n} of the server's answer is not one den writes: {line[:80]!r}"
            )


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


def _span(lines: list[str], name: str, end: str) -> tuple[int, int] | None:
    """(begin, end) line numbers of the block named ``name``, or None; ValueError
    when its markers are not one clean pair (a hand edit): nothing is guessed."""
    begins = [i for i, ln in enumerate(lines) if ln.startswith(f"# >>> {name}:")]
    ends = [i for i, ln in enumerate(lines) if ln.rstrip("\n") == end]
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(
            f"the markers of {name}'s block are broken (a begin without its end, or twice); "
            "fix them by hand or remove the block, then install again"
        )
    return begins[0], ends[0]


def install(path: Path, text: str) -> str:
    """Write ``text`` into ``path`` as its named block; say what was done.

    ValueError (nothing written) for a text with a line den would not write,
    or a file whose markers are broken.
    """
    check(text)
    name = block_name(text)
    begin = f"# >>> {name}: written by `den ssh-config --install`; replaced on the next >>>"
    end = f"# <<< {name} <<<"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    target = Path(os.path.realpath(path))
    try:
        old = target.read_text()
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        old, st = "", None
    lines = old.splitlines(keepends=True)
    span = _span(lines, name, end)
    if span is not None:
        new = "".join(lines[: span[0]]) + block + "".join(lines[span[1] + 1 :])
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
                # The file keeps its owner (run with sudo, it must stay the
                # user's) and its mode, never writable by others (ssh refuses).
                if st is not None and os.geteuid() == 0:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                os.fchmod(f.fileno(), (st.st_mode & 0o755 & ~0o022) if st else 0o600)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return f"{done}: {name} in {path}"
