"""Migrations on a real SQLite file: an older database is brought to the newest schema."""

from __future__ import annotations

import json
import sqlite3
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
