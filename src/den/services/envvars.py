"""Environment variables the metadata service gives a workspace (GET /v1/env).

Set by the owner or an admin, for one workspace (``den env set NAME K=V``) or
for all of a user's (``den env set 'ALICE/*' K=V``, ``'*'`` for your own; a
workspace's own value wins). Values are sealed at rest (den.secretbox, purpose
"env:SCOPE:KEY"), shown masked by ``den env ls`` unless ``--reveal``, and
never reach a log or the audit log: the params field is ``env`` (den.log's
input_shapes keeps only names and lengths of it) or ``secret_file`` (masked
by name), and the model serializes ``env`` as key names only.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, Field, field_serializer
from sqlalchemy import delete, or_, select

from den import secretbox
from den.db.models import EnvVar
from den.errors import InvalidParams, NotFound
from den.rpc.registry import Cli, CliArg, CliOpt, Context, Params, Right, method
from den.services.common import user_or_self
from den.services.workspaces import find_workspace

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App

KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
MAX_VALUE = 32 << 10
MAX_VARS = 200


def _purpose(scope: str, key: str) -> str:
    return f"env:{scope}:{key}"


def _parse(items: list[str], secret_file: str) -> dict[str, str]:
    """KEY=VALUE items and dotenv lines; errors name the key or position, never a value."""
    out: dict[str, str] = {}
    lines = [
        ln for ln in secret_file.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    for i, item in enumerate([*items, *lines]):
        key, eq, value = item.partition("=")
        key = key.strip().removeprefix("export ").strip() if i >= len(items) else key
        if not eq:
            raise InvalidParams(f"item {i + 1} is not KEY=VALUE", field="env")
        if not KEY_RE.fullmatch(key):
            raise InvalidParams(
                f"item {i + 1}: a name is letters, digits and _ (not first), up to 128",
                field="env",
            )
        if len(value.encode()) > MAX_VALUE:
            raise InvalidParams(f"{key}: a value is at most {MAX_VALUE} bytes", field="env")
        out[key] = value
    if len(out) > MAX_VARS:
        raise InvalidParams(f"at most {MAX_VARS} variables at once", field="env")
    return out


class _Target(Params):
    ref: Annotated[str, CliArg()] = Field(
        max_length=80,
        description="Workspace NAME or OWNER/NAME; OWNER/* (or *): all of a user's workspaces.",
    )


class EnvSet(_Target):
    # Named ``env``: den.log.input_shapes keeps only the names and lengths.
    env: Annotated[list[str], CliArg()] = Field(
        default_factory=list, description="KEY=VALUE (values land in your shell history)."
    )
    secret_file: Annotated[str, CliOpt(flags=("--from-file",), read_file=True)] = Field(
        "", description="KEY=VALUE lines (dotenv) from a file or - for stdin."
    )

    @field_serializer("env")
    def _names_only(self, value: list[str]) -> dict[str, str]:
        # Every key set (from the file too), never a value: what the audit log keeps.
        lines = [ln.strip().removeprefix("export ").strip() for ln in self.secret_file.splitlines()]
        items = [*value, *(ln for ln in lines if "=" in ln and not ln.startswith("#"))]
        return {item.partition("=")[0][:128]: "***" for item in items[:MAX_VARS]}

    @field_serializer("secret_file")
    def _no_file(self, value: str) -> str:
        return f"<{len(value)} chars>"


class EnvList(_Target):
    reveal: bool = Field(False, description="Show the values (else masked).")


class EnvRemove(_Target):
    key: Annotated[str, CliArg()] = Field(max_length=128, description="The variable's name.")


class EnvOut(BaseModel):
    key: str
    value: str
    scope: str = Field(description="workspace or user (all of the owner's workspaces).")
    updated_by: str
    updated_at: datetime


def _all_of(ref: str) -> bool:
    return ref == "*" or ref.endswith("/*")


async def _scope(ctx: Context, p: _Target) -> tuple[str, dict[str, Any], str]:
    """(scope key, row columns, audit target) of a workspace or a user."""
    if _all_of(p.ref):
        user = await user_or_self(ctx, p.ref[:-2] or None)
        return f"user:{user.id}", {"user_id": user.id}, f"user:{user.name}"
    ws, owner = await find_workspace(ctx, p.ref)
    return f"ws:{ws.id}", {"ws_id": ws.id}, f"workspace:{owner.name}/{ws.name}"


@method("env.set", right=Right.write, cli=Cli("env set"))
async def env_set(ctx: Context, p: EnvSet) -> list[str]:
    """Set variables a workspace reads from its metadata service (GET /v1/env)."""
    values = _parse(p.env, p.secret_file)
    if not values:
        raise InvalidParams("give at least one KEY=VALUE", field="env")
    scope, cols, ctx.target = await _scope(ctx, p)
    rows = {
        r.key: r
        for r in (
            await ctx.db.execute(
                select(EnvVar).where(EnvVar.scope == scope, EnvVar.key.in_(values))
            )
        ).scalars()
    }
    now = datetime.now(UTC)
    data_dir = ctx.app.settings.data_dir
    for key, value in values.items():
        sealed = secretbox.seal(data_dir, value.encode(), _purpose(scope, key))
        row = rows.get(key)
        if row is None:
            ctx.db.add(
                EnvVar(
                    scope=scope,
                    key=key,
                    value_sealed=sealed,
                    updated_by=ctx.caller.name,
                    updated_at=now,
                    **cols,
                )
            )
        else:
            row.value_sealed, row.updated_by, row.updated_at = sealed, ctx.caller.name, now
    await ctx.db.flush()
    return sorted(values)


@method("env.list", right=Right.read, cli=Cli("env ls", columns=("key", "value", "scope")))
async def env_list(ctx: Context, p: EnvList) -> list[EnvOut]:
    """List a workspace's (or a user's) variables, values masked unless --reveal."""
    scope, _, ctx.target = await _scope(ctx, p)
    scopes = [scope]
    if not _all_of(p.ref):  # the owner's variables reach it too
        _, owner = await find_workspace(ctx, p.ref)
        scopes.append(f"user:{owner.id}")
    rows = (
        (await ctx.db.execute(select(EnvVar).where(EnvVar.scope.in_(scopes)).order_by(EnvVar.key)))
        .scalars()
        .all()
    )
    return [
        EnvOut(
            key=r.key,
            value=_open(ctx.app, r) if p.reveal else "***",
            scope="workspace" if r.scope.startswith("ws:") else "user",
            updated_by=r.updated_by,
            updated_at=r.updated_at,
        )
        for r in rows
    ]


@method("env.remove", right=Right.write, cli=Cli("env rm"))
async def env_remove(ctx: Context, p: EnvRemove) -> list[str]:
    """Remove a variable from a workspace (or from a user's, with --user)."""
    scope, _, ctx.target = await _scope(ctx, p)
    where = (EnvVar.scope == scope, EnvVar.key == p.key)
    if (await ctx.db.execute(select(EnvVar.id).where(*where))).first() is None:
        raise NotFound(f"no variable {p.key!r} there; `den env ls` lists them")
    await ctx.db.execute(delete(EnvVar).where(*where))
    return [p.key]


def _open(app: App, row: EnvVar) -> str:
    return secretbox.unseal(
        app.settings.data_dir, row.value_sealed, _purpose(row.scope, row.key)
    ).decode()


async def env_of(app: App, db: AsyncSession, ws_id: str, owner_id: int) -> dict[str, str]:
    """What GET /v1/env gives: the owner's variables, the workspace's over them."""
    rows = (
        (
            await db.execute(
                select(EnvVar).where(
                    or_(EnvVar.scope == f"ws:{ws_id}", EnvVar.scope == f"user:{owner_id}")
                )
            )
        )
        .scalars()
        .all()
    )
    rows = sorted(rows, key=lambda r: r.scope.startswith("ws:"))  # the workspace's win
    return {r.key: _open(app, r) for r in rows}
