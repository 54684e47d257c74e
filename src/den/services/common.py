"""Helpers shared by the service modules: names, human text, scoping, durations."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import AfterValidator
from sqlalchemy import select

from den.db.models import User
from den.errors import InvalidParams, NotFound
from den.rpc.registry import Context

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")


def _check_name(value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ValueError(
            "a name is 1 to 31 characters: a lowercase letter, then lowercase letters, "
            "digits or '-'"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]
# A user called "null" would be read as "nobody given" by every tool that passes JSON around;
# "root" would make ``ssh root+NAME@host`` (root inside NAME) mean root's workspace NAME.
_RESERVED_USERS = {"null", "none", "nil", "undefined", "root"}


def _check_user_name(value: str) -> str:
    if value in _RESERVED_USERS:
        raise ValueError(f"{value!r} is reserved; choose another user name")
    return value


UserName = Annotated[Name, AfterValidator(_check_user_name)]

# Human text den stores and shows to others (a display name, a token's description, a note):
# a control character in it is never meant, and where it is shown raw (a terminal, a log line,
# a git header) it is an escape sequence or a cut. C0, DEL and C1 controls, the Unicode line
# and paragraph separators, and lone surrogates (JSON escapes can carry one; UTF-8 cannot
# store it) are refused rather than cleaned, so that what den stores is what was sent.
_NOT_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# A commit message has lines and may indent with tabs; nothing else in C0.
_NOT_TEXT = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def is_line(value: str) -> bool:
    """Whether ``value`` is one line of printable text (what ``Line`` takes)."""
    return not _NOT_LINE.search(value)


def _check_line(value: str) -> str:
    if not is_line(value):
        raise ValueError("must be one line of printable text (no control characters)")
    return value


def _check_text(value: str) -> str:
    if _NOT_TEXT.search(value):
        raise ValueError(
            "must be printable text (no control characters other than newline and tab)"
        )
    return value


# One line of human text; bound its length with Field(max_length=...) where it is used.
Line = Annotated[str, AfterValidator(_check_line)]
# Lines of human text (newlines and tabs allowed), e.g. a commit message.
Text = Annotated[str, AfterValidator(_check_text)]


async def release_db(ctx: Context) -> None:
    """Commit the call's session before host work, so that none is held across it.

    A session holds a pooled connection (and, once it wrote, SQLite's one write
    lock) until it ends: an exec of minutes would keep both that long, and a few
    such calls empty the pool for everyone. Objects stay usable (the sessions
    do not expire on commit); the next use of ``ctx.db`` opens a fresh, short
    transaction for what the call records afterwards (activity, audit).
    """
    if ctx._db is not None and ctx._db.in_transaction():
        await ctx._db.commit()


async def find_user(ctx: Context, name: str) -> User:
    """The user ``name`` as the caller may see it: members see only themselves."""
    if not ctx.caller.is_admin and name != ctx.caller.name:
        raise NotFound(f"no user named {name!r}")
    user = (await ctx.db.execute(select(User).where(User.name == name))).scalar_one_or_none()
    if user is None:
        raise NotFound(f"no user named {name!r}; `den user ls` lists users")
    return user


async def user_or_self(ctx: Context, name: str | None) -> User:
    """The named user, or the caller's own user when no name is given."""
    if name is None:
        if ctx.caller.user_id is None:
            raise InvalidParams(f"{ctx.caller.name} is not a den user; name a user", field="user")
        name = ctx.caller.name
    return await find_user(ctx, name)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# The longest duration den takes anywhere (an idle timeout, "since", an expiry):
# past it a value is a typo, and far past it datetime arithmetic overflows.
MAX_DURATION = 366 * 86400


def is_duration(text: str) -> bool:
    """Whether ``text`` is written as a duration: 30s, 5m, 1.5h, 1h30m, 2w."""
    t = text.strip().lower()
    return bool(t) and _DURATION_RE.search(t) is not None and _DURATION_RE.sub("", t).strip() == ""


def parse_duration(value: str, *, field: str, limit: int = MAX_DURATION) -> int:
    """Seconds of a duration (30s, 5m, 1.5h, 1h30m, 2w, or bare seconds), at most ``limit``."""
    text = value.strip().lower()
    if text.isdigit():
        seconds = float(text)
    elif is_duration(text):
        seconds = sum(float(n) * _UNITS[u] for n, u in _DURATION_RE.findall(text))
    else:
        raise InvalidParams(
            f"{value[:40]!r} is not a duration: write 30s, 5m, 2h, 1h30m, 7d or 2w", field=field
        )
    if not seconds <= limit:  # also inf, from a number of hundreds of digits
        raise InvalidParams(f"a duration is at most {limit // 86400} days ({limit} s)", field=field)
    return round(seconds)


def parse_when(value: str, *, field: str, future: bool) -> datetime:
    """A moment given as a duration ("30d", "12h", "1h30m") or an ISO 8601 time.

    A duration counts forward from now when ``future``, else backward; it is at
    most MAX_DURATION long.
    """
    if is_duration(value):
        delta = timedelta(seconds=parse_duration(value, field=field))
        return datetime.now(UTC) + delta if future else datetime.now(UTC) - delta
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidParams(
            f"{value[:40]!r} is neither a duration like 30d, 12h, 90m nor an ISO 8601 time",
            field=field,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment
