"""Daily LLM budgets of each user, counted per UTC day.

A request is counted when it is let through, before it reaches a provider,
so that the requests-per-day budget is exact even under concurrency. Its
tokens are added when the upstream's answer says how many it used (or, when
it says nothing, as den estimates them from the bytes sent and received); a budget
of tokens can thus be passed by the requests already in flight when it runs
out (at most ``llm_max_concurrent`` of them), never by a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update

from den.db.models import LlmBudget, LlmUsage

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from den.app import App
    from den.config import Settings


def day_of(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%d")


def resets_at(now: datetime) -> datetime:
    """The next UTC midnight: when today's budgets start afresh."""
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + timedelta(days=1)


@dataclass(frozen=True)
class Limits:
    tokens_per_day: int  # 0: no limit
    requests_per_day: int


@dataclass(frozen=True)
class Used:
    requests: int
    tokens: int
    estimated: int  # requests whose tokens den estimated (the upstream gave no usage)


class BudgetSpent(Exception):
    """A request refused because one of the owner's daily budgets is used up."""

    def __init__(self, which: str, limit: int, used: int, resets: datetime) -> None:
        super().__init__(which)
        self.which = which  # "tokens" or "requests"
        self.limit = limit
        self.used = used
        self.resets = resets


class TooMany(Exception):
    """A request refused because the owner has ``limit`` requests in flight."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


@dataclass
class _State:
    locks: dict[int, asyncio.Lock] = field(default_factory=dict)
    in_flight: dict[int, int] = field(default_factory=dict)


# One per daemon: the App is the daemon's runtime; tests may run several in one process.
_STATES: weakref.WeakKeyDictionary[App, _State] = weakref.WeakKeyDictionary()


def _state(app: App) -> _State:
    st = _STATES.get(app)
    if st is None:
        st = _STATES[app] = _State()
    return st


async def limits_of(db: AsyncSession, settings: Settings, user_id: int) -> Limits:
    row = await db.get(LlmBudget, user_id)
    tokens = row.tokens_per_day if row is not None else None
    requests = row.requests_per_day if row is not None else None
    return Limits(
        settings.llm_tokens_per_day if tokens is None else tokens,
        settings.llm_requests_per_day if requests is None else requests,
    )


async def used_on(db: AsyncSession, user_id: int, day: str) -> Used:
    row = (
        await db.execute(
            select(
                func.coalesce(func.sum(LlmUsage.requests), 0),
                func.coalesce(func.sum(LlmUsage.total_tokens), 0),
                func.coalesce(func.sum(LlmUsage.unmetered), 0),
            ).where(LlmUsage.user_id == user_id, LlmUsage.day == day)
        )
    ).one()
    return Used(int(row[0]), int(row[1]), int(row[2]))


@contextlib.asynccontextmanager
async def slot(app: App, user_id: int) -> AsyncIterator[None]:
    """One of the user's ``llm_max_concurrent`` in-flight requests, or TooMany."""
    st = _state(app)
    limit = app.settings.llm_max_concurrent
    if st.in_flight.get(user_id, 0) >= limit:
        raise TooMany(limit)
    st.in_flight[user_id] = st.in_flight.get(user_id, 0) + 1
    try:
        yield
    finally:
        st.in_flight[user_id] -= 1
        if st.in_flight[user_id] <= 0:
            del st.in_flight[user_id]


async def _add(
    db: AsyncSession, user_id: int, day: str, provider: str, model: str, **counts: int
) -> None:
    key = (user_id, day, provider, model)
    if await db.get(LlmUsage, key) is None:
        zero = dict.fromkeys(
            ("requests", "unmetered", "prompt_tokens", "completion_tokens", "total_tokens"), 0
        )
        db.add(LlmUsage(user_id=user_id, day=day, provider=provider, model=model, **zero))
        await db.flush()
    cols = LlmUsage.__table__.c
    await db.execute(
        update(LlmUsage)
        .where(
            LlmUsage.user_id == user_id,
            LlmUsage.day == day,
            LlmUsage.provider == provider,
            LlmUsage.model == model,
        )
        .values({name: cols[name] + n for name, n in counts.items()})
    )


async def admit(app: App, user_id: int, provider: str, model: str, now: datetime) -> str:
    """Count one request of the user's for today, or raise BudgetSpent; returns the day."""
    st = _state(app)
    lock = st.locks.setdefault(user_id, asyncio.Lock())
    day = day_of(now)
    # The daemon is the only writer of usage rows: a lock per user makes the
    # check and the count one step, and the row's insert free of races.
    async with lock, app.sessions() as db:
        lim = await limits_of(db, app.settings, user_id)
        used = await used_on(db, user_id, day)
        if lim.requests_per_day and used.requests >= lim.requests_per_day:
            raise BudgetSpent("requests", lim.requests_per_day, used.requests, resets_at(now))
        if lim.tokens_per_day and used.tokens >= lim.tokens_per_day:
            raise BudgetSpent("tokens", lim.tokens_per_day, used.tokens, resets_at(now))
        await _add(db, user_id, day, provider, model, requests=1)
        await db.commit()
    return day


def usage_counts(usage: Any) -> dict[str, int] | None:
    """prompt, completion and total tokens from an OpenAI ``usage`` object, or None."""
    if not isinstance(usage, dict):
        return None

    def num(name: str) -> int:
        v = usage.get(name)
        # An upstream's figures are bounded: a bogus one must not overflow a column.
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 40 else 0

    prompt, completion = num("prompt_tokens"), num("completion_tokens")
    total = num("total_tokens") or prompt + completion
    if not (prompt or completion or total) and "total_tokens" not in usage:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def estimate(sent: int, received: int) -> dict[str, int]:
    """Tokens of a request whose upstream gave no usage: about four bytes a token
    of what was sent and received (JSON's syntax makes it an overestimate, which
    is the side a budget should err on)."""
    prompt, completion = -(-sent // 4), -(-received // 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def settle(
    app: App,
    user_id: int,
    day: str,
    provider: str,
    model: str,
    counts: dict[str, int],
    *,
    estimated: bool = False,
) -> None:
    """Add a finished request's tokens (counted as estimated ones when ``estimated``)."""
    lock = _state(app).locks.setdefault(user_id, asyncio.Lock())
    async with lock, app.sessions() as db:
        # The column named "unmetered" counts the requests whose tokens were estimated.
        await _add(db, user_id, day, provider, model, unmetered=int(estimated), **counts)
        await db.commit()
