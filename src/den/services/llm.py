"""LLM gateway methods: providers (admins), budgets (admins) and usage.

A provider's key is sent once, sealed at rest (den.secretbox) and read back
only by the gateway to forward a request: no method returns it, and the audit
log records the field as ``***`` (its name, ``secret``, is one the redaction
masks).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, Field
from sqlalchemy import select

from den import secretbox
from den.db.models import LlmBudget, LlmProvider, LlmUsage, User
from den.errors import Conflict, InvalidParams, NotFound
from den.llm import gateway  # noqa: F401 - adds its routes to the metadata app
from den.llm.budget import day_of, limits_of, resets_at, used_on
from den.rpc.registry import Cli, CliArg, CliOpt, Context, NoParams, Params, Right, method
from den.services.common import Name, find_user

MAX_MODELS = 200
# A model name as providers spell them (gpt-4o-mini, meta-llama/Llama-3-8B,
# claude-3-5-sonnet@20240620): printable, no spaces, no commas (the CLI's separator).
_MODEL_RE = re.compile(r"[!-+\--~]{1,200}")
# A key goes into an HTTP header: printable ASCII without spaces, nothing that ends a line.
_KEY_RE = re.compile(r"[!-~]{1,4096}")


def key_purpose(name: str) -> str:
    return f"llm-provider:{name}"


def _split_models(value: object) -> object:
    """``--models a,b --models c`` and ``["a", "b,c"]`` alike: one list of names."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [m.strip() for v in value if isinstance(v, str) for m in v.split(",") if m.strip()]
    return value


def _check_models(models: list[str]) -> list[str]:
    for m in models:
        if not _MODEL_RE.fullmatch(m):
            raise ValueError(
                f"{m[:60]!r} is not a model name (1 to 200 printable characters, "
                "no spaces or commas)"
            )
    if len(set(models)) != len(models):
        raise ValueError("a model is listed twice")
    return models


Models = Annotated[list[str], BeforeValidator(_split_models)]


class ProviderAdd(Params):
    name: Annotated[Name, CliArg()] = Field(description="The provider's name in den.")
    base_url: str = Field(
        max_length=2000,
        description="Its OpenAI-compatible API root, e.g. https://api.openai.com/v1.",
    )
    secret: Annotated[str, CliOpt(flags=("--key-file",), read_file=True)] = Field(
        max_length=8192, description="Its API key (the CLI reads it from a file)."
    )
    models: Annotated[Models, CliOpt(flags=("--models",))] = Field(
        min_length=1,
        max_length=MAX_MODELS,
        description="The models it serves, comma-separated (a request names one).",
    )


class ProviderRef(Params):
    name: Annotated[Name, CliArg()] = Field(description="The provider's name.")


class ProviderOut(BaseModel):
    name: str
    base_url: str
    models: list[str]
    created_by: str
    created_at: datetime


def _base_url(text: str) -> str:
    url = text.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise InvalidParams(f"{url[:80]!r} is not a URL", field="base_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParams(
            "the base URL must be http:// or https:// with a host, e.g. https://api.openai.com/v1",
            field="base_url",
        )
    if parts.username is not None or parts.password is not None:
        # Credentials in a URL end up in logs and listings: the key has its own field.
        raise InvalidParams(
            "the base URL must not carry credentials; give the key with --key-file",
            field="base_url",
        )
    if parts.query or parts.fragment:
        raise InvalidParams("the base URL takes no query or fragment", field="base_url")
    if not is_printable(url):
        raise InvalidParams("the base URL must be printable ASCII", field="base_url")
    return url.rstrip("/")


def is_printable(text: str) -> bool:
    return all("!" <= c <= "~" for c in text)


def _out(p: LlmProvider) -> ProviderOut:
    return ProviderOut(
        name=p.name,
        base_url=p.base_url,
        models=list(p.models or []),
        created_by=p.created_by,
        created_at=p.created_at,
    )


@method(
    "llm.provider.add",
    right=Right.admin,
    cli=Cli("llm provider add", note="Workspaces reach it at http://169.254.169.254/v1."),
)
async def provider_add(ctx: Context, p: ProviderAdd) -> ProviderOut:
    """Add an upstream LLM provider that workspaces reach through den's gateway.

    The key is sealed at rest, forwarded only to this provider's base URL, and
    never shown again nor written to a log or the audit log.
    """
    ctx.require_admin("add LLM providers")
    ctx.target = f"llm-provider:{p.name}"
    base_url = _base_url(p.base_url)
    try:
        models = _check_models(p.models)
    except ValueError as exc:
        raise InvalidParams(str(exc), field="models") from None
    key = p.secret.strip()
    if not _KEY_RE.fullmatch(key):
        # Never echo it: say what is wrong with it only.
        raise InvalidParams(
            "the key must be one line of printable ASCII without spaces (1 to 4096 characters)",
            field="secret",
        )
    if (await ctx.db.execute(select(LlmProvider).where(LlmProvider.name == p.name))).scalar():
        raise Conflict(f"an LLM provider {p.name!r} exists; remove it first to replace it")
    # One provider per model: a request names a model, and must reach one place.
    for other in (await ctx.db.execute(select(LlmProvider))).scalars():
        taken = sorted(set(other.models or []) & set(models))
        if taken:
            raise Conflict(f"provider {other.name!r} already serves {', '.join(taken)[:300]}")
    row = LlmProvider(
        name=p.name,
        base_url=base_url,
        key_sealed=secretbox.seal(ctx.app.settings.data_dir, key.encode(), key_purpose(p.name)),
        models=models,
        created_by=ctx.caller.name,
        created_at=datetime.now(UTC),
    )
    ctx.db.add(row)
    await ctx.db.flush()
    return _out(row)


@method(
    "llm.provider.ls",
    right=Right.admin,
    cli=Cli("llm provider ls", columns=("name", "base_url", "models", "created_by")),
)
async def provider_ls(ctx: Context, p: NoParams) -> list[ProviderOut]:
    """The LLM providers of den's gateway and their models (never their keys)."""
    ctx.require_admin("list LLM providers")
    rows = (await ctx.db.execute(select(LlmProvider).order_by(LlmProvider.name))).scalars()
    return [_out(r) for r in rows]


@method(
    "llm.provider.rm",
    right=Right.admin,
    cli=Cli("llm provider rm", confirm="Remove this LLM provider and forget its key?"),
)
async def provider_rm(ctx: Context, p: ProviderRef) -> ProviderOut:
    """Remove an LLM provider and its sealed key; its models are no longer served."""
    ctx.require_admin("remove LLM providers")
    ctx.target = f"llm-provider:{p.name}"
    row = (
        await ctx.db.execute(select(LlmProvider).where(LlmProvider.name == p.name))
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no LLM provider {p.name!r}; `den llm provider ls` lists them")
    out = _out(row)
    await ctx.db.delete(row)
    return out


# -- budgets and usage ------------------------------------------------------------

_LIMIT_HELP = "; 0: no limit; -1: back to den's default (the llm_*_per_day setting)."


class BudgetSet(Params):
    user: Annotated[Name, CliArg()] = Field(description="The user.")
    tokens_per_day: int | None = Field(
        None, ge=-1, le=1 << 50, description="Tokens per UTC day" + _LIMIT_HELP
    )
    requests_per_day: int | None = Field(
        None, ge=-1, le=1 << 50, description="Requests per UTC day" + _LIMIT_HELP
    )


class ModelUsage(BaseModel):
    provider: str
    model: str
    requests: int
    estimated: int = Field(
        description="Requests whose upstream reported no usage: their tokens are den's estimate."
    )
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageOut(BaseModel):
    user: str
    day: str = Field(description="The UTC day counted (YYYY-MM-DD).")
    requests: int
    requests_per_day: int = Field(description="0: no limit.")
    tokens: int
    tokens_per_day: int = Field(description="0: no limit.")
    estimated: int = Field(
        description="Requests whose upstream reported no usage: their tokens are den's estimate."
    )
    resets_at: datetime
    models: list[ModelUsage]


async def _usage(ctx: Context, user: User, now: datetime) -> UsageOut:
    day = day_of(now)
    lim = await limits_of(ctx.db, ctx.app.settings, user.id)
    used = await used_on(ctx.db, user.id, day)
    rows = (
        await ctx.db.execute(
            select(LlmUsage)
            .where(LlmUsage.user_id == user.id, LlmUsage.day == day)
            .order_by(LlmUsage.provider, LlmUsage.model)
        )
    ).scalars()
    return UsageOut(
        user=user.name,
        day=day,
        requests=used.requests,
        requests_per_day=lim.requests_per_day,
        tokens=used.tokens,
        tokens_per_day=lim.tokens_per_day,
        estimated=used.estimated,
        resets_at=resets_at(now),
        models=[
            ModelUsage(
                provider=r.provider,
                model=r.model,
                requests=r.requests,
                estimated=r.unmetered,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                total_tokens=r.total_tokens,
            )
            for r in rows
        ],
    )


@method("llm.budget.set", right=Right.admin, cli=Cli("llm budget set"))
async def budget_set(ctx: Context, p: BudgetSet) -> UsageOut:
    """Set a user's daily LLM budgets (tokens, requests); unset ones stay as they are."""
    ctx.require_admin("set LLM budgets")
    user = await find_user(ctx, p.user)
    ctx.target = f"user:{user.name}"
    if p.tokens_per_day is None and p.requests_per_day is None:
        raise InvalidParams("give --tokens-per-day or --requests-per-day", field="tokens_per_day")
    row = await ctx.db.get(LlmBudget, user.id)
    if row is None:
        row = LlmBudget(user_id=user.id, tokens_per_day=None, requests_per_day=None)
        ctx.db.add(row)
    if p.tokens_per_day is not None:
        row.tokens_per_day = None if p.tokens_per_day < 0 else p.tokens_per_day
    if p.requests_per_day is not None:
        row.requests_per_day = None if p.requests_per_day < 0 else p.requests_per_day
    await ctx.db.flush()
    return await _usage(ctx, user, datetime.now(UTC))


class UsageQuery(Params):
    user: Annotated[Name | None, CliArg()] = Field(
        None, description="The user (default: you; admins: every user)."
    )


@method(
    "llm.usage",
    right=Right.read,
    cli=Cli(
        "llm usage",
        columns=(
            "user",
            "requests",
            "requests_per_day",
            "tokens",
            "tokens_per_day",
            "estimated",
            "resets_at",
        ),
    ),
)
async def llm_usage(ctx: Context, p: UsageQuery) -> list[UsageOut]:
    """Today's LLM gateway use against the daily budgets (yours; an admin's: everyone's)."""
    now = datetime.now(UTC)
    if p.user is not None:
        users = [await find_user(ctx, p.user)]
    elif ctx.caller.is_admin:
        users = list((await ctx.db.execute(select(User).order_by(User.name))).scalars())
    else:
        if ctx.caller.user_id is None:
            raise InvalidParams(f"{ctx.caller.name} is not a den user; name a user", field="user")
        users = [await find_user(ctx, ctx.caller.name)]
    return [await _usage(ctx, u, now) for u in users]
