"""Running git as root on repos, trusted or written by a workspace.

A workspace controls every byte of its code snapshot and can change any of
them at any instant: a check of its ``.git`` followed by a git command on
the live snapshot is a race the workspace wins (a filter or
``core.sshCommand`` swapped in between runs as root; a symlink planted where
git writes sends the write onto the host). So den runs git on a workspace's
repos in only two ways:

- *reading* (``code.changes``): on a frozen, read-only btrfs snapshot of the
  workspace's tree (:meth:`den.storage.pool.Pool.frozen`), which nothing can
  change while git reads it and git cannot write to. The checks below then
  hold for the whole run: ``.git`` is a plain directory with no symlinks, no
  ``commondir`` and no alternates, and its config sets only keys from a short
  allow-list; system and global config are ignored, and every command runs
  with hooks, fsmonitor, transport helpers, auto-gc and submodule recursion
  switched off from the command line (which outranks the repo's config), with
  an explicit ``--git-dir`` so that git never discovers a repo somewhere above.
- *writing* (``code.push``): inside the workspace, with its own git, ids,
  namespaces, network and credentials (:func:`den.storage.code.push` with a
  runner that executes there); nothing runs on the host.

The shared tree is written only by den for admins and is trusted.
"""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from den import proc

HARDEN = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "protocol.ext.allow=never",
    "-c", "protocol.fd.allow=never",
    "-c", "commit.gpgsign=false",
    "-c", "gc.auto=0",
    "-c", "maintenance.auto=false",
    "-c", "submodule.recurse=false",
    "-c", "diff.ignoreSubmodules=all",
    "-c", "push.recurseSubmodules=no",
    "-c", "core.pager=cat",
)  # fmt: skip

# Keys an untrusted repo's .git/config may set: none of them runs a program.
_SAFE_KEY = re.compile(
    r"""(
      core\.(repositoryformatversion|filemode|bare|logallrefupdates|ignorecase
            |precomposeunicode|symlinks|autocrlf|eol|safecrlf|quotepath|abbrev
            |compression|loosecompression|bigfilethreshold|untrackedcache|checkstat
            |trustctime|preloadindex|splitindex|commitgraph|multipackindex)
     |remote\.[^\n]+\.(url|pushurl|fetch|tagopt|prune|prunetags)
     |branch\.[^\n]+\.(remote|pushremote|merge|rebase|description)
     |(user|author|committer)\.(name|email)
     |init\.defaultbranch|pull\.(rebase|ff)|push\.(default|autosetupremote)
     |fetch\.(prune|prunetags)|commit\.gpgsign|tag\.gpgsign|gc\.auto
     |advice\.[a-z0-9]+|color\.[^\n]+|extensions\.objectformat
     |submodule\.[^\n]+\.(url|active)
    )""",
    re.X,
)
MAX_FILES = 100
MAX_GIT_ENTRIES = 200_000
MAX_CONFIG = 1 << 20
UNTRUSTED_TIMEOUT = 60.0  # per git command on a workspace's snapshot


class UnsafeRepo(Exception):
    """A repo den will not run git in as root; the message says why."""


# For repos a workspace wrote: no configuration but the repo's own (checked) one.
UNTRUSTED_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_ATTR_NOSYSTEM": "1",
    "HOME": "/nonexistent",
    "XDG_CONFIG_HOME": "/nonexistent",
}


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The daemon's environment without GIT_* variables, never prompting."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "XDG_"))}
    out.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_OPTIONAL_LOCKS="0",  # status must not fight git running inside the workspace
        GIT_SSH_COMMAND="ssh -o BatchMode=yes",  # a constant: no caller input reaches it
        LC_ALL="C.UTF-8",
    )
    out.update(extra or {})
    return out


async def run(
    *args: str,
    repo: Path | None = None,
    check: bool = True,
    input: bytes | None = None,
    timeout: float = 300.0,
    extra_env: dict[str, str] | None = None,
) -> proc.Result:
    """``git ARGS`` hardened; with ``repo``, in that work tree and its ``.git`` only."""
    argv = ["git", *HARDEN]
    if repo is not None:
        argv += ["-C", str(repo), "--git-dir", str(repo / ".git"), "--work-tree", str(repo)]
    argv += args
    return await proc.run(argv, check=check, input=input, timeout=timeout, env=env(extra_env))


async def read_config(repo: Path) -> dict[str, list[str]]:
    """The repo's own ``.git/config`` (no includes followed): key -> values."""
    cfg = repo / ".git" / "config"
    if not cfg.is_file():
        return {}
    res = await run(
        "config", "--file", str(cfg), "--null", "--list", check=False, extra_env=UNTRUSTED_ENV
    )
    return parse_config(res.stdout)


def parse_config(out: str) -> dict[str, list[str]]:
    """``git config --null --list`` output as key -> values."""
    config: dict[str, list[str]] = {}
    for item in out.split("\0"):
        if item:
            key, _, value = item.partition("\n")
            config.setdefault(key, []).append(value)
    return config


def _plain_files(gitdir: Path) -> None:
    """Every entry of ``gitdir`` a directory or a small-enough regular file, and not too many.

    No symlink leads out; no FIFO or device can make git (or den) wait.
    """
    stack, seen = [gitdir], 0
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                seen += 1
                if seen > MAX_GIT_ENTRIES:
                    raise UnsafeRepo(f".git holds more than {MAX_GIT_ENTRIES} entries")
                rel = Path(entry.path).relative_to(gitdir.parent)
                if entry.is_symlink():
                    raise UnsafeRepo(f"{rel} is a symlink")
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    raise UnsafeRepo(f"{rel} is neither a file nor a directory")
    config = gitdir / "config"
    if os.path.lexists(config) and config.lstat().st_size > MAX_CONFIG:
        raise UnsafeRepo(f".git/config is larger than {MAX_CONFIG >> 10} KiB")


def check_layout(root: Path, rel: str) -> None:
    """Raise :class:`UnsafeRepo` unless ``root/rel/.git`` is a plain, self-contained repo."""
    repo = root / rel
    if os.path.realpath(repo) != os.path.join(os.path.realpath(root), rel):
        raise UnsafeRepo("its path goes through a symlink")
    gitdir = repo / ".git"
    if gitdir.is_symlink() or not gitdir.is_dir():
        raise UnsafeRepo(".git is not a plain directory")
    for name in ("commondir", "objects/info/alternates", "objects/info/http-alternates"):
        if os.path.lexists(gitdir / name):
            raise UnsafeRepo(f".git/{name} points git at another repo")
    _plain_files(gitdir)


def check_config(config: dict[str, list[str]]) -> None:
    """Raise :class:`UnsafeRepo` unless the repo's config sets only allow-listed keys."""
    for key in config:
        if not _SAFE_KEY.fullmatch(key):
            raise UnsafeRepo(
                f"its .git/config sets {key[:80]}, which den does not run as root; "
                "remove it, or commit and push from inside the workspace"
            )


@dataclass
class RepoState:
    """What ``git status`` says about one repo, as seen from its tree."""

    path: str
    branch: str | None = None
    upstream: str | None = None
    remote: str | None = None
    ahead: int | None = None
    behind: int | None = None
    dirty: bool = False
    unpushed: int = 0
    files: list[str] = field(default_factory=list)
    problem: str | None = None


def chosen_remote(config: dict[str, list[str]], branch: str | None) -> str | None:
    """The remote a branch pushes to: its configured one, else origin, else the only one."""
    if branch is not None:
        named = config.get(f"branch.{branch}.remote")
        if named and f"remote.{named[-1]}.url" in config:
            return named[-1]
    remotes = [
        k[len("remote.") : -len(".url")]
        for k in config
        if k.startswith("remote.") and k.endswith(".url")
    ]
    if "origin" in remotes:
        return "origin"
    return remotes[0] if len(remotes) == 1 else None


async def status(root: Path, rel: str, *, untrusted: bool) -> RepoState:
    """Branch, remote, ahead/behind (as of the last fetch), dirty files of ``root/rel``.

    ``untrusted``: ``root`` is a frozen snapshot of a workspace's tree (see
    the module's docstring); the repo is checked first and git sees no
    configuration but its own.
    """
    repo = root / rel
    state = RepoState(path=rel)
    try:
        if untrusted:  # before reading: .git/config may be a symlink; off the loop: may be big
            await asyncio.to_thread(check_layout, root, rel)
        config = await read_config(repo)
        if untrusted:
            check_config(config)
    except UnsafeRepo as exc:
        state.problem = str(exc)
        return state
    extra = UNTRUSTED_ENV if untrusted else None
    limit = UNTRUSTED_TIMEOUT if untrusted else 300.0
    res = await run(
        "status", "--porcelain=v2", "--branch", "-z", "--ignore-submodules=all",
        repo=repo, check=False, extra_env=extra, timeout=limit,
    )  # fmt: skip
    if res.returncode != 0:
        state.problem = (res.stderr.strip().splitlines() or ["git status failed"])[-1][:300]
        return state
    initial = parse_status(res.stdout, state)
    remote = chosen_remote(config, state.branch)
    if remote is not None:
        state.remote = config[f"remote.{remote}.url"][-1]
    if state.upstream is not None and state.ahead is not None:
        state.unpushed = state.ahead
    elif not initial:
        count = await run(
            "rev-list", "--count", "HEAD", "--not", "--remotes",
            repo=repo, check=False, extra_env=extra, timeout=limit,
        )  # fmt: skip
        state.unpushed = int(count.stdout.strip() or 0) if count.returncode == 0 else 0
    return state


def parse_status(out: str, state: RepoState) -> bool:
    """Fill ``state`` from ``git status --porcelain=v2 --branch -z``; True when no commit yet."""
    initial = False
    items = iter(out.split("\0"))
    for item in items:
        if item.startswith("# branch.oid "):
            initial = item.endswith("(initial)")
        elif item.startswith("# branch.head "):
            head = item[len("# branch.head ") :]
            state.branch = None if head == "(detached)" else head
        elif item.startswith("# branch.upstream "):
            state.upstream = item[len("# branch.upstream ") :]
        elif item.startswith("# branch.ab "):
            a, b = item[len("# branch.ab ") :].split()
            state.ahead, state.behind = int(a), -int(b)
        elif item[:2] in ("1 ", "2 ", "u ", "? "):
            state.dirty = True
            fields = {"1": 8, "2": 9, "u": 10, "?": 1}[item[0]]
            path = item.split(" ", fields)[-1]
            if item[0] == "2":
                next(items, None)  # the rename's original path
            if len(state.files) < MAX_FILES:
                state.files.append(path)
    return initial
