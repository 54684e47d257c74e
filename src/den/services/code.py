"""The code tree: clone, list and reorganize the shared tree; changes and push per workspace.

The shared tree (``/code/<server>/<org>/<repo>``) is written only by admins,
since a clone runs as root and may read any path on the host. A workspace
holds its own copy-on-write snapshot of the tree; its owner reviews and
pushes the work done there.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import select

from den import proc
from den.backends.base import ExecRequest
from den.db.models import User, Workspace
from den.errors import BackendFailure, Conflict, InvalidParams, NotFound
from den.rpc.registry import Cli, CliArg, CliOpt, Context, NoParams, Params, Right, method
from den.services import account
from den.services.common import Text
from den.services.power import ensure_running
from den.services.workspaces import spec_of
from den.storage import code, giturl
from den.storage.git import RepoState

_GIT_TIMEOUT = 600.0
_REF_RE = re.compile(r"(?:([a-z][a-z0-9-]{0,30})/)?([a-z][a-z0-9-]{0,30})")


def _check_repo_path(value: str) -> str:
    try:
        return giturl.check_rel(value).rel
    except InvalidParams as exc:
        raise ValueError(exc.errors[0]["message"]) from None


RepoPath = Annotated[str, AfterValidator(_check_repo_path)]


class RepoOut(BaseModel):
    path: str = Field(description="SERVER/ORG/REPO inside the tree.")
    branch: str | None = Field(description="Checked-out branch; null when HEAD is detached.")
    upstream: str | None = Field(description="The branch's upstream, e.g. origin/main.")
    remote: str | None = Field(description="URL of the branch's remote.")
    ahead: int | None = Field(description="Commits not on the upstream (as of the last fetch).")
    behind: int | None = Field(description="Upstream commits not here (as of the last fetch).")
    dirty: bool = Field(description="Uncommitted changes or untracked files.")


class ChangeOut(RepoOut):
    unpushed: int = Field(description="Commits on no remote branch (or ahead of the upstream).")
    files: list[str] = Field(description="Changed and untracked paths (at most 100).")
    problem: str | None = Field(description="Why den did not look inside, if it did not.")


class MoveOut(BaseModel):
    source: str
    target: str
    status: str = Field(description="planned, moved, refused or skipped.")
    reason: str


class PushOut(BaseModel):
    workspace: str
    repo: str
    branch: str
    remote: str
    ref: str = Field(description="The remote branch pushed to.")
    commit: str | None = Field(description="The commit made from uncommitted changes, if any.")
    head: str
    commits: int = Field(description="Commits the push sent.")


def _repo(s: RepoState) -> RepoOut:
    return RepoOut(
        path=s.path, branch=s.branch, upstream=s.upstream, remote=s.remote,
        ahead=s.ahead, behind=s.behind, dirty=s.dirty,
    )  # fmt: skip


def _change(s: RepoState) -> ChangeOut:
    return ChangeOut(**_repo(s).model_dump(), unpushed=s.unpushed, files=s.files, problem=s.problem)


class CloneParams(Params):
    url: Annotated[str, CliArg()] = Field(
        max_length=giturl.MAX_URL,
        description="https://, ssh://, git://, user@host:org/repo, file:// or an absolute path.",
    )


class ReorganizeParams(Params):
    apply: bool = Field(False, description="Move the repos; without it, only show the plan.")


class WorkspaceParams(Params):
    workspace: Annotated[str, CliArg()] = Field(
        max_length=80, description="NAME (yours) or OWNER/NAME."
    )


class PushParams(WorkspaceParams):
    repo: RepoPath | None = Field(
        None,
        max_length=300,
        description="Repo path in /code, e.g. github.com/org/repo (default: the one with changes).",
    )
    message: Annotated[Text, CliOpt(flags=("--message", "-m"))] = Field(
        min_length=1, max_length=20000, description="Commit message."
    )


@method("code.clone", right=Right.admin, cli=Cli("code clone"))
async def code_clone(ctx: Context, p: CloneParams) -> RepoOut:
    """Clone a git repo into the shared code tree at SERVER/ORG/REPO (admins)."""
    place = giturl.parse(p.url)
    ctx.target = f"code:{place.rel}"
    return _repo(await code.clone(ctx.app.pool.code, p.url))


@method(
    "code.list",
    right=Right.read,
    cli=Cli("code ls", columns=("path", "branch", "remote", "ahead", "behind", "dirty")),
)
async def code_list(ctx: Context, p: NoParams) -> list[RepoOut]:
    """List the repos of the shared code tree with branch, remote, ahead/behind and dirty state."""
    return [_repo(s) for s in await code.list_repos(ctx.app.pool.code)]


@method(
    "code.reorganize",
    right=Right.admin,
    cli=Cli("code reorganize", columns=("source", "target", "status", "reason")),
)
async def code_reorganize(ctx: Context, p: ReorganizeParams) -> list[MoveOut]:
    """Move shared-tree repos to SERVER/ORG/REPO from their remote URL (dry run unless --apply)."""
    ctx.target = "code:reorganize"
    moves = await code.reorganize(ctx.app.pool.code, apply=p.apply)
    return [
        MoveOut(source=m.source, target=m.target, status=m.status, reason=m.reason) for m in moves
    ]


@method(
    "code.changes",
    right=Right.read,
    cli=Cli("code changes", columns=("path", "branch", "upstream", "dirty", "unpushed", "problem")),
)
async def code_changes(ctx: Context, p: WorkspaceParams) -> list[ChangeOut]:
    """List the repos in a workspace's /code with uncommitted or unpushed work."""
    _ws, _owner, tree = await _snapshot(ctx, p.workspace)
    return [_change(s) for s in await _frozen_changes(ctx, tree)]


async def _frozen_changes(ctx: Context, tree: Path) -> list[RepoState]:
    """The changes of a workspace's tree, read from a frozen read-only snapshot of it."""
    await ctx.db.commit()  # no database transaction held across the host work
    async with ctx.app.pool.frozen(tree) as frozen:
        return await code.changes(frozen)


@method("code.push", right=Right.write, cli=Cli("code push"))
async def code_push(ctx: Context, p: PushParams) -> PushOut:
    """Commit a workspace repo's changes (git add -A) and push them to its upstream branch.

    git runs inside the workspace (which needs git installed), as its user, with
    its network and credentials (its own keys, or a forwarded agent).
    """
    ws, owner, tree = await _snapshot(ctx, p.workspace)
    ref = f"{owner.name}/{ws.name}"
    rel = p.repo
    if rel is None:
        pending = [s.path for s in await _frozen_changes(ctx, tree)]
        if len(pending) != 1:
            listed = ", ".join(pending[:10]) or "none"
            raise InvalidParams(
                f"name the repo with --repo; repos with changes: {listed}", field="repo"
            )
        rel = pending[0]
    ctx.target = f"code:{ref}:{rel}"
    author = code.Identity(
        owner.display_name or owner.name, owner.email or f"{owner.name}@{_host()}"
    )
    committer = await _committer(ctx, author)
    run = await _git_inside(ctx, ws, owner, rel)
    pushed = await code.push(run, rel, p.message, author=author, committer=committer)
    return PushOut(
        workspace=ref, repo=pushed.path, branch=pushed.branch, remote=pushed.remote,
        ref=pushed.ref, commit=pushed.commit, head=pushed.head, commits=pushed.commits,
    )  # fmt: skip


async def _git_inside(ctx: Context, ws: Workspace, owner: User, rel: str) -> code.GitRunner:
    """A runner of git in ``/code/REL`` inside the running (or resumed) workspace."""
    await ensure_running(ctx, ws, owner, "exec")
    spec = spec_of(ctx.app, ws, owner)
    state = dict(ws.backend_state or {})
    user = account.git_account(spec, rel)
    await ctx.db.commit()  # no database transaction held while git runs
    where = f"{owner.name}/{ws.name}"

    async def run(args: list[str], stdin: bytes, env: dict[str, str]) -> proc.Result:
        argv = ["git", "-C", f"/code/{rel}", *args]
        req = ExecRequest(
            argv=argv, env={"GIT_TERMINAL_PROMPT": "0", **env}, cwd="/", stdin=stdin,
            timeout=_GIT_TIMEOUT, user=user,
        )  # fmt: skip
        with ctx.app.activity.busy(ws.id, "exec"):
            res = await ctx.app.backend_for(spec).exec(spec, state, req)
        out = proc.Result(
            argv, res.exit_code, res.stdout.decode(errors="replace"),
            res.stderr.decode(errors="replace"), 0.0,
        )  # fmt: skip
        if res.timed_out:
            raise BackendFailure(f"git {args[0]} in {where} did not finish in {_GIT_TIMEOUT:.0f}s")
        if res.exit_code == 127:
            raise Conflict(
                f"git is not installed in workspace {where}; install it there "
                "(e.g. apt-get install git) and push again"
            )
        return out

    return run


def _host() -> str:
    return socket.gethostname() or "den"


async def _committer(ctx: Context, author: code.Identity) -> code.Identity:
    """Who pushes: the caller (an admin may push another user's work)."""
    if ctx.caller.user_id is None:
        return code.Identity(ctx.caller.name, f"{ctx.caller.name}@{_host()}")
    user = await ctx.db.get(User, ctx.caller.user_id)
    if user is None:
        return author
    return code.Identity(user.display_name or user.name, user.email or f"{user.name}@{_host()}")


async def _snapshot(ctx: Context, ref: str) -> tuple[Workspace, User, Path]:
    """The workspace named by ``ref`` (members: only their own) and its code snapshot."""
    m = _REF_RE.fullmatch(ref)
    if m is None:
        raise InvalidParams(
            f"{ref[:80]!r} is not a workspace: write NAME or OWNER/NAME", field="workspace"
        )
    owner_name, name = m[1], m[2]
    if owner_name is None:
        if ctx.caller.user_id is None:
            raise InvalidParams(
                f"{ctx.caller.name} owns no workspaces: write OWNER/NAME", field="workspace"
            )
        owner_name = ctx.caller.name
    missing = NotFound(f"no workspace {ref!r}; `den ls` lists yours")
    if not ctx.caller.is_admin and owner_name != ctx.caller.name:
        raise missing
    q = (
        select(Workspace, User)
        .join(User, Workspace.user_id == User.id)
        .where(User.name == owner_name, Workspace.name == name)
    )
    row = (await ctx.db.execute(q)).first()
    if row is None or row[0].state == "deleting":
        raise missing
    ws, owner = row[0], row[1]
    tree = ctx.app.pool.volume_dir(ws.id) / "code"
    if not tree.is_dir():
        raise Conflict(f"workspace {owner.name}/{ws.name} has no code snapshot (it is {ws.state})")
    return ws, owner, tree
