"""Database engine: SQLite (WAL) by default, PostgreSQL by URL; migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from den.errors import BackendFailure

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def normalize_url(url: str) -> str:
    """Pick the async driver for a plain database URL."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> AsyncEngine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1]
        file = Path(path) if path and path != ":memory:" else None
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            private_files(file)
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
            if file is not None:
                private_files(file)  # the -wal and -shm exist now

        return engine
    return create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True)


def private_files(db: Path) -> None:
    """Make the SQLite database and its journal files readable by root only.

    They hold the audit log and token hashes. A missing database is created
    0600 before SQLite opens it, so the -wal and -shm it makes take the same
    mode; files an older den left 0644 are fixed here, at every start.
    """
    with contextlib.suppress(FileExistsError):
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    for f in (db, *(db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal"))):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(f.lstat().st_mode) & 0o077 and not f.is_symlink():
                os.chmod(f, 0o600)


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _upgrade(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url))
    command.upgrade(cfg, "head")


async def migrate(url: str) -> None:
    """Bring the schema to the newest revision (runs alembic in a thread)."""
    try:
        await asyncio.to_thread(_upgrade, url)
    except OSError as exc:
        raise BackendFailure(f"cannot open the state database: {exc}") from exc
