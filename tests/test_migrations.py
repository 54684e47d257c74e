"""Migrations on a real SQLite file: an older database is brought to the newest schema."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from alembic import command
from alembic.config import Config

from den.db.engine import MIGRATIONS, _upgrade, normalize_url


def test_old_exec_audit_rows_lose_their_input(tmp_path: Path) -> None:
    """Rows an older den wrote with exec env values, stdin and arguments in clear keep
    only names and lengths after the upgrade; other rows are untouched."""
    db = tmp_path / "den.db"
    url = f"sqlite:///{db}"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url))
    command.upgrade(cfg, "0003")
    secret = "hunter2-secret-value"
    old = {"ref": "a/b", "argv": ["sh", "-c", f"echo {secret}"], "env": {"TOKEN": secret},
           "stdin": secret}  # fmt: skip
    other = {"name": "x", "note": "kept"}
    with sqlite3.connect(db) as c:
        for method, params in (("workspace.exec", old), ("user.create", other)):
            c.execute(
                "INSERT INTO audit_events (at, actor, via, method, target, params, outcome, "
                "error, duration_ms) VALUES (datetime('now'), 'root', 'unix', ?, '', ?, 'ok', '', 0)",
                (method, json.dumps(params)),
            )
    _upgrade(url)
    with sqlite3.connect(db) as c:
        rows = dict(c.execute("SELECT method, params FROM audit_events").fetchall())
        assert c.execute("SELECT version_num FROM alembic_version").fetchone()[0] >= "0004"
    assert secret not in rows["workspace.exec"]
    shaped = json.loads(rows["workspace.exec"])
    assert shaped["ref"] == "a/b" and list(shaped["env"]) == ["TOKEN"]
    assert shaped["argv"][0] == "sh" and len(shaped["argv"]) == 3
    assert json.loads(rows["user.create"]) == other


def test_browser_sessions_from_before_binding_are_signed_out(tmp_path: Path) -> None:
    """An older TCP listener's session cookie would stay good from every address: the
    upgrade that binds new ones signs the old ones out (which door made them is not
    known), and the rest of the row stays."""
    db = tmp_path / "den.db"
    url = f"sqlite:///{db}"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url))
    command.upgrade(cfg, "0010")
    with sqlite3.connect(db) as c:
        c.execute(
            "INSERT INTO users (name, role, display_name, account, created_at, updated_at) "
            "VALUES ('ann', 'member', '', 'den-ann', datetime('now'), datetime('now'))"
        )
        c.execute(
            "INSERT INTO browser_sessions (id, user_id, secret_hash, client, agent, created_at, "
            "expires_at) VALUES ('abc', 1, 'h', '127.0.0.1', 'a', datetime('now'), "
            "datetime('now', '+14 days'))"
        )
    _upgrade(url)
    with sqlite3.connect(db) as c:
        row = c.execute(
            "SELECT id, client, bound_client, revoked_at FROM browser_sessions"
        ).fetchone()
    assert row[:3] == ("abc", "127.0.0.1", None)
    revoked = datetime.fromisoformat(row[3])
    assert (
        abs((revoked.replace(tzinfo=revoked.tzinfo or UTC) - datetime.now(UTC)).total_seconds())
        < 60
    )
