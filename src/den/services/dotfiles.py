"""Dotfiles: a user's repository, cloned into a new workspace and installed there as the user.

``den user set NAME --dotfiles URL`` gives every new workspace of the user a
repository; ``den new NAME --dotfiles URL`` gives one workspace its own (an
empty URL: none). Once the workspace runs, a background job (``den job ls``)
runs one script inside it, as the account sessions land in, with a timeout:

1. ``git clone URL ~/.dotfiles``; when that is a clone of the same URL
   already, a fast-forward pull of it instead; anything else there is moved
   to ``~/.dotfiles-backup/`` first;
2. the first of ``install.sh``, ``bootstrap.sh``, ``setup.sh`` that the
   repository has, run in the clone (directly when executable, else with
   ``sh``);
3. without any of them: every top-level name starting with ``.`` (but
   ``.git``, ``.github`` and ``.gitmodules``, which are the repository's own)
   is linked into the home. A real file or another link in the way is moved
   to ``~/.dotfiles-backup/`` first, never overwritten.

``den new`` does not wait for it: the workspace is usable at once and
``den show`` tells how the dotfiles went (state running, ok or failed, and
the tail of the output). A failure never fails the workspace;
``den dotfiles NAME`` runs them again.

Nothing of it runs on the host: git and the scripts run inside the
workspace, in its namespaces and with its user's ids. URLs are remote ones
only (a local path or file:// would name this host's files). A URL may
carry credentials (``https://user:token@host/...``): they are kept to run
again, and masked in everything den shows or logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, Field

from den.backends.base import ExecRequest
from den.db.models import User, Workspace
from den.errors import BackendFailure, Conflict, DenError, InvalidParams
from den.rpc.registry import Cli, CliArg, Context, Params, Right, method
from den.services import account
from den.services.jobs import JOBS, Job, JobOut
from den.storage import giturl

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)

CLONE_DIR = ".dotfiles"  # in the user's home
TIMEOUT = 600  # seconds for the clone and the script together
MAX_LOG = 16 << 10  # bytes of output kept: the tail, where failures show
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/]*)(.*)", re.S)
_USERINFO = re.compile(r"[A-Za-z0-9._~%+][A-Za-z0-9._~%+-]*(?::[A-Za-z0-9._~%+-]*)?")
_REMOTE = "https://, http://, ssh://, git:// or user@host:path"

# -- URLs ------------------------------------------------------------------------


def check_url(url: str, field: str = "dotfiles") -> str:
    """``url`` when den accepts it for dotfiles ("" : none); else InvalidParams.

    den's git URL rules apply (src/den/storage/giturl.py), with two changes:
    only remote URLs, and credentials are allowed in the user part.
    """
    if not url:
        return url
    m = _SCHEME.fullmatch(url)
    if url.startswith(("/", ".", "~")) or (m is not None and m[1].lower() == "file"):
        raise InvalidParams(
            f"dotfiles come from a remote repository ({_REMOTE}): a local path or file:// "
            "would name this host's files, and the clone runs inside the workspace",
            field=field,
        )
    bare = url
    if m is not None and "@" in m[2]:
        userinfo, _, hostport = m[2].rpartition("@")
        if not _USERINFO.fullmatch(userinfo):
            raise InvalidParams(
                "the user part of the URL (before '@') may hold only letters, digits and "
                ". _ ~ % + - (and one ':' before a password or token)",
                field=field,
            )
        bare = f"{m[1]}://{hostport}{m[3]}"
    elif m is None and "@" not in url and ":" not in url:
        raise InvalidParams(
            f"{shown(url)[:100]!r} is not a repository URL: use {_REMOTE}", field=field
        )
    giturl.parse(bare, field)
    return url


def shown(url: str) -> str:
    """``url`` with its credentials masked: a password, and a token given as an
    http(s) user name. An ssh login name (git@host) is no secret and stays."""
    m = _SCHEME.fullmatch(url)
    if m is None or "@" not in m[2]:
        return url
    userinfo, _, hostport = m[2].rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    elif m[1].lower() in ("http", "https"):
        userinfo = "***"
    return f"{m[1]}://{userinfo}@{hostport}{m[3]}"


def _accepted(url: str) -> str:
    try:
        return check_url(url)
    except InvalidParams as exc:
        raise ValueError(exc.errors[0]["message"]) from None  # pydantic names the field


DotfilesUrl = Annotated[
    str,
    Field(max_length=giturl.MAX_URL),
    AfterValidator(_accepted),
]

# -- what den shows ----------------------------------------------------------------

# Workspace id -> the job running its dotfiles now (a job lives in this daemon's memory).
_running: dict[str, Job] = {}
_INTERRUPTED = "den: the daemon stopped before the dotfiles were done"
_STOPPED = "den: stopped before the end (den job cancel, or the daemon stopping)"


def state_of(ws: Workspace) -> str:
    """The state den shows: a run whose job this daemon no longer has was cut short."""
    if ws.dotfiles_state == "running" and ws.id not in _running:
        return "failed"
    return ws.dotfiles_state


def log_of(ws: Workspace, ref: str) -> str:
    text = ws.dotfiles_log
    if ws.dotfiles_state == "running" and ws.id not in _running:
        text = f"{text}\n{_INTERRUPTED}".lstrip("\n")
    if state_of(ws) == "failed":
        text += f"\nden: `den dotfiles {ref}` runs them again"
    return text


def summary(ws: Workspace) -> dict[str, str]:
    """The dotfiles fields of a workspace as listed (its output only in ``den show``)."""
    return {"dotfiles_url": shown(ws.dotfiles_url), "dotfiles_state": state_of(ws)}


# -- the run, inside the workspace -------------------------------------------------

# Runs as the user, in the home. $1: the steps below; $2: timeout; $3: bytes kept.
# The steps write to a file and only its tail comes back: an install script may
# print megabytes, and what went wrong is at the end.
_OUTER = r"""
out=$(mktemp) || exit 1
if command -v timeout >/dev/null 2>&1; then
  timeout -k 10 "$2" sh -c "$1" den-dotfiles >"$out" 2>&1 </dev/null
else
  sh -c "$1" den-dotfiles >"$out" 2>&1 </dev/null
fi
rc=$?
[ "$rc" -eq 124 ] && echo "den: stopped after $2 s (the time dotfiles may take)" >>"$out"
tail -c "$3" "$out"
rm -f "$out"
exit "$rc"
"""

_STEPS = r"""
set -u
dir="$HOME/.dotfiles"
keep() {  # move $1 (in the home) aside, never overwriting an earlier one
  mkdir -p "$HOME/.dotfiles-backup" || exit 1
  to="$HOME/.dotfiles-backup/${1##*/}" n=1
  while [ -e "$to" ] || [ -L "$to" ]; do to="$HOME/.dotfiles-backup/${1##*/}.$n"; n=$((n+1)); done
  mv "$1" "$to" || exit 1
  echo "den: moved the existing ~/${1##*/} to $to"
}
if ! command -v git >/dev/null 2>&1; then
  echo "den: git is not installed in this workspace (its image has none): install git, then run den dotfiles again"
  exit 127
fi
if [ -d "$dir/.git" ] && [ "$(git -C "$dir" remote get-url origin 2>/dev/null)" = "$DEN_DOTFILES_URL" ]; then
  echo "den: updating $dir from $DEN_DOTFILES_SHOWN"
  git -C "$dir" pull --ff-only || exit $?
else
  if [ -e "$dir" ] || [ -L "$dir" ]; then keep "$dir"; fi
  echo "den: cloning $DEN_DOTFILES_SHOWN into $dir"
  git clone -- "$DEN_DOTFILES_URL" "$dir" || exit $?
fi
cd "$dir" || exit 1
for s in install.sh bootstrap.sh setup.sh; do
  if [ -f "$s" ]; then
    echo "den: running $s"
    if [ -x "$s" ]; then "./$s"; else sh "./$s"; fi
    rc=$?
    echo "den: $s exited with $rc"
    exit "$rc"
  fi
done
echo "den: no install.sh, bootstrap.sh or setup.sh: linking the dotfiles into $HOME"
for f in .[!.]* ..?*; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  case "$f" in .git|.github|.gitmodules) continue ;; esac
  target="$HOME/$f"
  [ -L "$target" ] && [ "$(readlink "$target")" = "$dir/$f" ] && continue
  if [ -e "$target" ] || [ -L "$target" ]; then keep "$target"; fi
  ln -s "$dir/$f" "$target" || exit 1
  echo "den: linked ~/$f"
done
"""


async def _install(app: App, ws_id: str) -> tuple[str, str]:
    """Run the steps in the workspace; (ok|failed, output tail)."""
    from den.services.workspaces import spec_of  # workspaces imports this module

    async with app.sessions() as db:
        ws = await db.get(Workspace, ws_id)
        owner = await db.get(User, ws.user_id) if ws is not None else None
        if ws is None or owner is None:
            raise Conflict("the workspace was deleted")
        spec, state, url = spec_of(app, ws, owner), dict(ws.backend_state or {}), ws.dotfiles_url
    user = (await account.login_account(app, spec)).name  # where sessions land: the owner's
    req = ExecRequest(
        argv=["/bin/sh", "-c", _OUTER, "den-dotfiles", _STEPS, str(TIMEOUT), str(MAX_LOG)],
        # The URL goes in the environment, which reaches the workspace in crun's
        # process spec: never on a command line of the host.
        env={
            "DEN_DOTFILES_URL": url,
            "DEN_DOTFILES_SHOWN": shown(url),
            "GIT_TERMINAL_PROMPT": "0",
            # No one is there to answer a prompt; an unknown host key is learnt.
            "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
        },
        cwd="",
        timeout=TIMEOUT + 30,
        user=user,
        max_output=MAX_LOG + 1024,
    )
    with app.activity.busy(ws_id, "dotfiles"):
        res = await app.backend_for(spec).exec(spec, state, req)
    text = (res.stdout + res.stderr)[-MAX_LOG:].decode(errors="replace")
    if res.timed_out:
        text += f"\nden: stopped after {TIMEOUT} s (the time dotfiles may take)"
    return ("ok" if res.exit_code == 0 and not res.timed_out else "failed"), text


async def _record(app: App, ws_id: str, state: str, text: str) -> None:
    async with app.sessions() as db:
        ws = await db.get(Workspace, ws_id)
        if ws is not None:
            ws.dotfiles_state, ws.dotfiles_log = state, text
            ws.dotfiles_at = datetime.now(UTC)
            await db.commit()


class DotfilesOut(BaseModel):
    workspace: str
    url: str
    state: str
    log: str


def _masked(text: str, url: str) -> str:
    """``text`` with the credentials of ``url`` masked where git printed them."""
    raw, masked = url.partition("://")[2].partition("/")[0], shown(url).partition("://")[2]
    masked = masked.partition("/")[0]
    return text.replace(raw, masked) if raw != masked else text


async def _outcome(app: App, ws_id: str, url: str) -> tuple[str, str]:
    """Install, record and return (state, output); nothing raised but a cancel."""
    try:
        state, text = await _install(app, ws_id)
    except asyncio.CancelledError:
        await asyncio.shield(_record(app, ws_id, "failed", _STOPPED))
        raise
    except DenError as exc:
        state, text = "failed", f"den: {exc.message}"
    except Exception:  # a background job's boundary: the workspace is not failed
        log.exception("dotfiles crashed", extra={"ctx": {"ws": ws_id}})
        state, text = "failed", "den: internal error; see the daemon log"
    text = _masked(text, url)  # git names the URL in some of its messages
    await _record(app, ws_id, state, text)
    return state, text


async def launch(ctx: Context, ws: Workspace, owner: User, url: str) -> Job:
    """Install ``url`` as the workspace's dotfiles in a job; den show says how it goes."""
    app, ws_id, ref = ctx.app, ws.id, f"{owner.name}/{ws.name}"
    if ws_id in _running:
        raise Conflict(
            f"the dotfiles of {ref} are being installed (job {_running[ws_id].id}); "
            "wait for it to end"
        )
    ws.dotfiles_url, ws.dotfiles_state, ws.dotfiles_log, ws.dotfiles_at = url, "running", "", None
    await ctx.db.commit()  # the job reads the URL from the database

    async def work(job: Job) -> DotfilesOut:
        job.progress(0, 1, "installing dotfiles")
        try:
            state, text = await _outcome(app, ws_id, url)
        finally:
            _running.pop(ws_id, None)  # after the outcome is recorded
        if state == "failed":
            last = text.rstrip().rpartition("\n")[2][:300]
            raise BackendFailure(
                f"dotfiles of {ref} failed: {last}. `den show {ref}` has the output; "
                f"`den dotfiles {ref}` runs them again"
            )
        return DotfilesOut(workspace=ref, url=shown(url), state=state, log=text)

    job = JOBS.start("workspace.dotfiles", f"workspace:{ref}", owner.name, work)
    _running[ws_id] = job
    return job


async def start_at_create(ctx: Context, ws: Workspace, owner: User, url: str | None) -> None:
    """After create: the workspace's URL (given, else the owner's) installed in the background."""
    url = owner.dotfiles_url if url is None else url
    if url:
        await launch(ctx, ws, owner, url)


# -- method ------------------------------------------------------------------------


class DotfilesRun(Params):
    ref: Annotated[str, CliArg()] = Field(max_length=80, description="NAME or OWNER/NAME.")
    url: DotfilesUrl | None = Field(
        None,
        description="Repository to use from now on (default: the workspace's, else its owner's).",
    )


@method("workspace.dotfiles", right=Right.write, cli=Cli("dotfiles", follow_job=True))
async def workspace_dotfiles(ctx: Context, p: DotfilesRun) -> JobOut:
    """Install a workspace's dotfiles (again), in the background; returns its job at once.

    The repository is cloned (or updated) at ~/.dotfiles inside the workspace as
    its user, then its install.sh, bootstrap.sh or setup.sh runs, or its
    dotfiles are linked into the home. `den show` has the state and output.
    """
    from den.services.power import ensure_running
    from den.services.workspaces import find_workspace

    ws, owner = await find_workspace(ctx, p.ref)
    ctx.target = f"workspace:{owner.name}/{ws.name}"
    url = p.url if p.url is not None else (ws.dotfiles_url or owner.dotfiles_url)
    if not url:
        raise InvalidParams(
            f"{owner.name}/{ws.name} has no dotfiles repository: give one with --url, or "
            f"set {owner.name}'s default with `den user set {owner.name} --dotfiles URL`",
            field="url",
        )
    await ensure_running(ctx, ws, owner, "exec")
    return (await launch(ctx, ws, owner, url)).out()
