"""Git URLs: which ones den accepts, and where each lives in the code tree.

A repo cloned from a URL lives at ``<server>/<org>/<repo>`` in the tree:

==================================  ====================
URL                                 place
==================================  ====================
https://github.com/org/repo(.git)   github.com/org/repo
ssh://git@host:2222/org/repo        host/org/repo
git@host:org/repo.git               host/org/repo
file:///srv/git/org/repo.git        local/org/repo
/srv/git/org/repo.git               local/org/repo
==================================  ====================

The org is the repo's parent directory, so a GitLab subgroup path
``group/sub/repo`` lands at ``host/sub/repo``; ports and user names are not
part of the place.

The URL reaches ``git`` as one argv element after ``--``, never a shell, but
it is checked anyway, since den runs git as root: only letters, digits and
``. _ ~ / : @ + -`` pass (so no shell metacharacter, whitespace or control
character does), nothing may start with ``-``, transport helpers (``ext::``,
``fd::``) and unknown schemes are refused, credentials do not belong in a URL
(they would land in every workspace's snapshot), a local path must be
absolute, and no path component may be empty, ``.`` or ``..``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from den.errors import InvalidParams

MAX_URL = 2048
LOCAL = "local"
_URL_CHARS = re.compile(r"[A-Za-z0-9._~/:@+-]*")
_COMPONENT = re.compile(r"[A-Za-z0-9._~+-]+")
_HOST = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.S)
_SCP = re.compile(r"(?:([^@/:]+)@)?([^@/:]+):(.*)", re.S)
_SCHEMES = {"https", "http", "ssh", "git", "git+ssh", "ssh+git", "file"}
ALLOWED_TEXT = "letters, digits and . _ ~ / : @ + -"


@dataclass(frozen=True)
class Place:
    """Where a repo belongs in the code tree."""

    server: str
    org: str
    repo: str

    @property
    def rel(self) -> str:
        return f"{self.server}/{self.org}/{self.repo}"


def _bad(message: str, field: str) -> InvalidParams:
    return InvalidParams(message, field=field)


def _describe(ch: str) -> str:
    if ch.isspace():
        return "whitespace"
    if ord(ch) < 32 or ord(ch) == 127:
        return "a control character"
    return repr(ch)


def check_component(part: str, what: str, field: str) -> str:
    """One path component: not empty, not ``.``/``..``, no leading ``-``, safe characters."""
    if part in ("", ".", ".."):
        shown = "an empty component" if not part else f"the component {part!r}"
        raise _bad(f"the {what} contains {shown}; '.', '..' and '//' are not allowed", field)
    if part.startswith("-"):
        raise _bad(f"a component of the {what} may not start with '-': {part[:60]!r}", field)
    if not _COMPONENT.fullmatch(part):
        raise _bad(
            f"the component {part[:60]!r} of the {what} has characters other than "
            "letters, digits and . _ ~ + -",
            field,
        )
    return part


def parse(url: str, field: str = "url") -> Place:
    """The place of ``url`` in the code tree; raises :class:`InvalidParams` when refused."""
    if not url:
        raise _bad("the URL is empty", field)
    if len(url) > MAX_URL:
        raise _bad(f"the URL is longer than {MAX_URL} characters", field)
    if url.startswith("-"):
        raise _bad("the URL starts with '-', which git would read as an option", field)
    if "::" in url:
        raise _bad("transport helpers such as ext:: and fd:: run programs; they are refused", field)
    bad = next((ch for ch in url if not _URL_CHARS.fullmatch(ch)), None)
    if bad is not None:
        raise _bad(
            f"the URL contains {_describe(bad)}; a git URL may hold only {ALLOWED_TEXT} "
            "(no shell metacharacters, whitespace or control characters)",
            field,
        )
    m = _SCHEME.fullmatch(url)
    if m is not None:
        return _with_scheme(m[1].lower(), m[2], field)
    if url.startswith("/"):
        return _local(url, field)
    scp = _SCP.fullmatch(url)
    if scp is not None:
        return _remote(scp[2], scp[3].lstrip("/"), field)
    raise _bad(
        "a local path must be absolute (/srv/git/org/repo.git); URLs are https://, ssh://, "
        "git://, file:// or user@host:org/repo",
        field,
    )


def _with_scheme(scheme: str, rest: str, field: str) -> Place:
    if scheme not in _SCHEMES:
        raise _bad(
            f"the scheme {scheme!r} is not accepted; use one of {', '.join(sorted(_SCHEMES))}",
            field,
        )
    authority, _, path = rest.partition("/")
    if scheme == "file":
        if authority not in ("", "localhost"):
            raise _bad("a file:// URL names a path on this host: file:///path/org/repo", field)
        return _local("/" + path, field)
    userinfo, _, hostport = authority.rpartition("@")
    if ":" in userinfo:
        raise _bad(
            "credentials do not belong in the URL (they would be copied into every "
            "workspace); give root's git a credential helper or an SSH key instead",
            field,
        )
    host, _, port = hostport.partition(":")
    if port and not port.isdigit():
        raise _bad(f"the port {port[:20]!r} is not a number", field)
    return _remote(host, path, field)


def _host(host: str, field: str) -> str:
    host = host.lower()
    if not _HOST.fullmatch(host) or ".." in host:
        raise _bad(f"{host[:100]!r} is not a host name", field)
    return host


def _split(path: str, field: str) -> tuple[str, str]:
    """(org, repo) from a URL path, checking every component."""
    if path.endswith("/") and not path.endswith("//"):
        path = path[:-1]
    if not path:
        raise _bad("the URL needs an org and a repo: .../org/repo", field)
    parts = path.split("/")
    for part in parts:
        check_component(part, "URL path", field)
    if parts[-1] == ".git":
        parts = parts[:-1]
    if len(parts) < 2:
        raise _bad("the URL needs an org and a repo: .../org/repo", field)
    repo = parts[-1].removesuffix(".git")
    check_component(repo, "repo name", field)
    return parts[-2], repo


def _remote(host: str, path: str, field: str) -> Place:
    org, repo = _split(path, field)
    return Place(_host(host, field), org, repo)


def _local(path: str, field: str) -> Place:
    org, repo = _split(path[1:], field)
    return Place(LOCAL, org, repo)


def check_rel(rel: str, field: str = "repo") -> Place:
    """A repo path inside a code tree (``server/org/repo``), checked like a URL path.

    A leading ``/code/`` (where workspaces see the tree) is accepted and dropped.
    """
    text = rel.removeprefix("/code/").strip("/") if rel.startswith("/code/") else rel
    parts = text.split("/")
    for part in parts:
        check_component(part, "repo path", field)
    if len(parts) != 3:
        raise _bad(
            f"a repo path is SERVER/ORG/REPO, e.g. github.com/org/repo; got {rel[:100]!r}", field
        )
    if parts[0].startswith("."):
        raise _bad("a server name does not start with '.'", field)
    return Place(*parts)
