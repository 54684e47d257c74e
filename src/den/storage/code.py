"""The code tree: ``<server>/<org>/<repo>`` git repos under one root.

The same functions serve the shared tree (``pool.code``, written only by
den as root: trusted) and a frozen read-only snapshot of a workspace's copy
of it (written by the workspace: untrusted, see :mod:`den.storage.git`).
Every git command on the host goes through :func:`den.storage.git.run`: an
argv list, never a shell. Pushing runs git through a :data:`GitRunner`,
inside the workspace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from den import proc
from den.errors import BackendFailure, Conflict, InvalidParams, NotFound
from den.storage import git, giturl
from den.storage.git import RepoState

log = logging.getLogger(__name__)
TMP_PREFIX = ".den-clone-"
_PARALLEL = 8
MAX_REPOS = 200  # looked at in one workspace's tree
CHANGES_TIMEOUT = 300.0
_REORGANIZE_DEPTH = 8


# -- the tree --------------------------------------------------------------------
def repo_paths(root: Path) -> list[str]:
    """Repos exactly three levels down (``server/org/repo``), sorted; no symlinks followed."""
    found: list[str] = []
    for server in _subdirs(root):
        if server.name.startswith("."):
            continue  # clones in progress
        for org in _subdirs(server):
            for repo in _subdirs(org):
                if os.path.lexists(repo / ".git"):
                    found.append(f"{server.name}/{org.name}/{repo.name}")
    return found


def _subdirs(path: Path) -> list[Path]:
    try:
        with os.scandir(path) as it:
            return sorted(Path(e.path) for e in it if e.is_dir(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []


async def _gather_status(root: Path, rels: list[str], untrusted: bool) -> list[RepoState]:
    sem = asyncio.Semaphore(_PARALLEL)

    async def one(rel: str) -> RepoState:
        async with sem:
            return await git.status(root, rel, untrusted=untrusted)

    return list(await asyncio.gather(*(one(r) for r in rels)))


async def list_repos(root: Path, *, untrusted: bool = False) -> list[RepoState]:
    """Every repo of the tree with branch, remote, ahead/behind and dirty state."""
    return await _gather_status(root, repo_paths(root), untrusted)


async def changes(root: Path, *, untrusted: bool = True) -> list[RepoState]:
    """Repos with uncommitted changes or commits not on their upstream (or any remote).

    For a workspace's (frozen) tree, at most :data:`MAX_REPOS` repos are looked
    at, the scan runs off the event loop and the whole call has a time limit.
    """
    rels = await asyncio.to_thread(repo_paths, root)
    if untrusted and len(rels) > MAX_REPOS:
        log.warning("too many repos in a workspace tree", extra={"ctx": {"repos": len(rels)}})
        rels = rels[:MAX_REPOS]
    try:
        async with asyncio.timeout(CHANGES_TIMEOUT):
            states = await _gather_status(root, rels, untrusted)
    except TimeoutError:
        raise BackendFailure(
            f"reading the workspace's repos took longer than {CHANGES_TIMEOUT:.0f}s"
        ) from None
    return [s for s in states if s.dirty or s.unpushed or s.problem]


# -- clone -------------------------------------------------------------------------
async def clone(root: Path, url: str, timeout: float = 1800.0) -> RepoState:
    """Clone ``url`` to its conventional place; a failed clone leaves nothing."""
    place = giturl.parse(url)
    target = root / place.rel
    if os.path.lexists(target):
        raise Conflict(f"{place.rel} exists already in the code tree")
    tmp = root / f"{TMP_PREFIX}{secrets.token_hex(6)}"
    try:
        res = await git.run(
            "clone", "--no-recurse-submodules", "--", url, str(tmp), check=False, timeout=timeout
        )
        if res.returncode != 0:
            raise BackendFailure(
                f"git clone failed: {_git_error(res)}", log_detail=res.stderr[-2000:]
            )
        # No await between the check and the rename: no other call can take the place meanwhile.
        if os.path.lexists(target):
            raise Conflict(f"{place.rel} was cloned by another call meanwhile")
        made = _mkdirs(root, target.parent)
        try:
            tmp.rename(target)
        except OSError:
            _prune(made)
            raise
    finally:
        if tmp.exists():
            await asyncio.to_thread(shutil.rmtree, tmp, True)
    log.info("cloned", extra={"ctx": {"url": url, "path": place.rel}})
    return await git.status(root, place.rel, untrusted=False)


def _git_error(res: proc.Result) -> str:
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("Cloning into")]
    return " ".join(lines)[-500:] or f"exit {res.returncode}"


def _mkdirs(root: Path, path: Path) -> list[Path]:
    """Create ``path`` and missing parents below ``root``; return those created, deepest first."""
    made: list[Path] = []
    p = path
    while p != root and not p.exists():
        made.append(p)
        p = p.parent
    for d in reversed(made):
        d.mkdir(mode=0o755)
    return made


def _prune(dirs: list[Path]) -> None:
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _prune_up(root: Path, path: Path) -> None:
    """Remove ``path`` and its parents up to ``root`` while they are empty."""
    while path != root and root in path.parents:
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


def cleanup_leftovers(root: Path) -> None:
    """Remove clones that a killed daemon left half-made."""
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        log.warning("removing a leftover clone", extra={"ctx": {"path": tmp}})
        shutil.rmtree(tmp, ignore_errors=True)


# -- reorganize ----------------------------------------------------------------------
@dataclass
class Move:
    source: str
    target: str
    status: str  # planned | moved | refused | skipped
    reason: str = ""


def _find_repos(root: Path) -> list[str]:
    """Repos anywhere in the tree (not inside another repo), as paths relative to root."""
    found: list[str] = []
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        path, depth = stack.pop()
        for sub in _subdirs(path):
            if depth == 0 and sub.name.startswith(TMP_PREFIX):
                continue
            if os.path.lexists(sub / ".git"):
                found.append(str(sub.relative_to(root)))
            elif depth + 1 < _REORGANIZE_DEPTH:
                stack.append((sub, depth + 1))
    return sorted(found)


def _inside_repo(root: Path, target: Path) -> str | None:
    """The repo (relative path) that ``target`` would land inside, if any."""
    p = target.parent
    while p != root:
        if os.path.lexists(p / ".git"):
            return str(p.relative_to(root))
        p = p.parent
    return None


async def reorganize(root: Path, *, apply: bool = False) -> list[Move]:
    """Moves that put every repo at the place its remote URL implies.

    Only planned unless ``apply``; a move whose target exists is refused.
    """
    moves: list[Move] = []
    taken: set[str] = set()
    for rel in _find_repos(root):
        config = await git.read_config(root / rel)
        remote = git.chosen_remote(config, None)
        if remote is None:
            moves.append(Move(rel, "", "skipped", "no remote (or several, none named origin)"))
            continue
        url = config[f"remote.{remote}.url"][-1]
        try:
            place = giturl.parse(url)
        except InvalidParams as exc:
            moves.append(
                Move(rel, "", "skipped", f"remote URL {url[:100]!r}: {exc.errors[0]['message']}")
            )
            continue
        if place.rel == rel:
            continue
        moves.append(_plan(root, rel, place.rel, taken))
    if apply:
        for m in moves:
            if m.status == "planned":
                _apply(root, m)
    return moves


def _plan(root: Path, rel: str, target: str, taken: set[str]) -> Move:
    tpath = root / target
    if os.path.lexists(tpath) or target in taken:
        return Move(rel, target, "refused", "the target exists")
    if target.startswith(rel + "/") or rel.startswith(target + "/"):
        return Move(rel, target, "refused", "the target and the repo lie inside each other")
    host = _inside_repo(root, tpath)
    if host is not None:
        return Move(rel, target, "refused", f"the target lies inside the repo {host}")
    taken.add(target)
    return Move(rel, target, "planned")


def _apply(root: Path, m: Move) -> None:
    src, dst = root / m.source, root / m.target
    if os.path.lexists(dst):
        m.status, m.reason = "refused", "the target exists"
        return
    made = _mkdirs(root, dst.parent)
    try:
        src.rename(dst)
    except OSError as exc:
        _prune(made)
        m.status, m.reason = "refused", f"rename failed: {exc.strerror}"
        return
    m.status = "moved"
    _prune_up(root, src.parent)
    log.info("moved a repo", extra={"ctx": {"from": m.source, "to": m.target}})


# -- push ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    name: str
    email: str

    def clean(self) -> Identity:
        def strip(s: str) -> str:
            return "".join(c for c in s if c not in "<>\n\r\0").strip() or "den"

        return Identity(strip(self.name), strip(self.email))


@dataclass
class Pushed:
    path: str
    branch: str
    remote: str
    ref: str
    commit: str | None  # the new commit, when there was something to commit
    head: str
    commits: int  # how many commits the push sent


GitRunner = Callable[[list[str], bytes, dict[str, str]], Awaitable[proc.Result]]
"""Runs ``git ARGS`` (with stdin and extra environment) in one repo and returns
its result; for a workspace, inside it (see :mod:`den.storage.git`)."""


async def push(
    run: GitRunner, rel: str, message: str, *, author: Identity, committer: Identity
) -> Pushed:
    """``git add -A``, commit and push to the upstream branch, each step through ``run``.

    Everything git does here happens where ``run`` runs it (inside the
    workspace): its config, hooks and credentials are the workspace's own.
    """
    rel = giturl.check_rel(rel).rel
    res = await run(
        ["status", "--porcelain=v2", "--branch", "-z", "--ignore-submodules=all"], b"", {}
    )
    if res.returncode != 0:
        if "not a git repository" in res.stderr or "cannot change to" in res.stderr:
            raise NotFound(f"no git repo at {rel} in this code tree")
        raise BackendFailure(f"git status failed in {rel}: {_last_line(res)}")
    state = RepoState(path=rel)
    initial = git.parse_status(res.stdout, state)
    if state.branch is None:
        raise Conflict(f"{rel} has a detached HEAD; check out a branch first")
    config = git.parse_config((await run(["config", "--null", "--list"], b"", {})).stdout)
    remote = git.chosen_remote(config, state.branch)
    if remote is None:
        raise Conflict(f"{rel} has no remote to push to (git remote add origin URL)")
    urls = config.get(f"remote.{remote}.url", []) + config.get(f"remote.{remote}.pushurl", [])
    ref = (config.get(f"branch.{state.branch}.merge") or [f"refs/heads/{state.branch}"])[-1]
    await _check_ref(ref)
    if state.upstream is not None and state.ahead is not None:
        unpushed = state.ahead
    elif initial:
        unpushed = 0
    else:
        count = await run(["rev-list", "--count", "HEAD", "--not", "--remotes"], b"", {})
        unpushed = int(count.stdout.strip() or 0) if count.returncode == 0 else 0
    if not state.dirty and not unpushed:
        raise Conflict(f"nothing to commit or push in {rel}")
    commit = None
    if state.dirty:
        commit = await _commit(run, rel, message, author.clean(), committer.clean())
    head = (await run(["rev-parse", "HEAD"], b"", {})).stdout.strip()
    res = await run(["push", "--porcelain", remote, f"HEAD:{ref}"], b"", {})
    if res.returncode != 0:
        _push_failed(rel, res, commit)
    log.info("pushed", extra={"ctx": {"path": rel, "ref": ref, "head": head}})
    return Pushed(rel, state.branch, urls[0], ref, commit, head, unpushed + (commit is not None))


def _last_line(res: proc.Result) -> str:
    return (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1][:300]


async def _check_ref(ref: str) -> None:
    if not ref.startswith("refs/heads/"):
        raise Conflict(f"the upstream {ref[:100]!r} is not a branch")
    res = await git.run("check-ref-format", ref, check=False)  # starts with refs/: no option
    if res.returncode != 0:
        raise Conflict(f"the upstream {ref[:100]!r} is not a valid branch name")


async def _commit(
    run: GitRunner, rel: str, message: str, author: Identity, committer: Identity
) -> str:
    res = await run(["add", "-A"], b"", {})
    if res.returncode != 0:
        raise BackendFailure(f"git add failed in {rel}: {_last_line(res)}")
    env = {
        "GIT_AUTHOR_NAME": author.name,
        "GIT_AUTHOR_EMAIL": author.email,
        "GIT_COMMITTER_NAME": committer.name,
        "GIT_COMMITTER_EMAIL": committer.email,
    }
    res = await run(["commit", "--no-verify", "--quiet", "-F", "-"], message.encode(), env)
    if res.returncode != 0:
        text = (res.stdout + res.stderr).strip()
        if "nothing to commit" in text or "nothing added to commit" in text:
            raise Conflict(f"nothing to commit in {rel}")
        raise BackendFailure(f"git commit failed: {text[-500:]}")
    return (await run(["rev-parse", "HEAD"], b"", {})).stdout.strip()


def _push_failed(rel: str, res: proc.Result, commit: str | None) -> None:
    text = (res.stdout + "\n" + res.stderr).strip()
    kept = f" (the commit {commit[:12]} stays in the workspace)" if commit else ""
    if "[rejected]" in text or "non-fast-forward" in text or "fetch first" in text:
        raise Conflict(
            f"the remote rejected the push of {rel}: it has commits the workspace lacks; "
            f"pull or rebase in the workspace, then push again{kept}"
        )
    if "[remote rejected]" in text:
        reason = text.split("[remote rejected]", 1)[1].splitlines()[0].strip()
        raise Conflict(f"the remote refused the push of {rel}: {reason[:300]}{kept}")
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    raise BackendFailure(f"git push of {rel} failed: {' '.join(lines)[-500:]}{kept}")


# -- the host mount --------------------------------------------------------------------
async def ensure_mount(tree: Path, mountpoint: Path) -> bool:
    """Bind-mount ``tree`` at ``mountpoint`` unless it is there already; True when mounted now."""
    if _is_mount(mountpoint):
        a, b = os.stat(tree), os.stat(mountpoint)
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            return False
        raise BackendFailure(
            f"{mountpoint} is a mount of something else; unmount it or change code_mount"
        )
    if mountpoint.is_symlink() or (mountpoint.exists() and not mountpoint.is_dir()):
        raise BackendFailure(
            f"{mountpoint} exists and is not a directory; cannot mount the code tree there"
        )
    if mountpoint.is_dir() and any(mountpoint.iterdir()):
        raise BackendFailure(
            f"{mountpoint} is not empty; move its repos into the code tree ({tree}) or set "
            "another code_mount"
        )
    mountpoint.mkdir(parents=True, exist_ok=True)
    await proc.run(["mount", "--bind", str(tree), str(mountpoint)])
    log.info("code tree mounted", extra={"ctx": {"at": mountpoint}})
    return True


def _is_mount(path: Path) -> bool:
    """Whether ``path`` is a mount point (a bind mount on the same filesystem included)."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


async def prepare(tree: Path, mountpoint: Path | None) -> None:
    """At daemon start: drop half-made clones, bind-mount the tree when configured."""
    await asyncio.to_thread(cleanup_leftovers, tree)
    if mountpoint is not None:
        await ensure_mount(tree, mountpoint)
