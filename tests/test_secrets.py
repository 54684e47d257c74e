"""Secrets at rest: the state database and its journal files are root's alone."""

from __future__ import annotations

import stat

from tests.conftest import Daemon


def db_modes(d: Daemon) -> dict[str, int]:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in d.data_dir.glob("den.db*")}


def test_database_files_are_private(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    d.call("user.create", name="dbmode")  # something written: the WAL is in use
    modes = db_modes(d)
    assert {"den.db", "den.db-wal", "den.db-shm"} <= modes.keys(), modes
    assert all(m == 0o600 for m in modes.values()), {k: oct(m) for k, m in modes.items()}


def test_database_left_readable_is_fixed_at_start(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    d.call("user.create", name="dbfix")
    d.stop()
    for f in d.data_dir.glob("den.db*"):
        f.chmod(0o644)
    d.start()
    assert d.call("user.get", name="dbfix")["name"] == "dbfix"
    modes = db_modes(d)
    assert "den.db" in modes
    assert all(m == 0o600 for m in modes.values()), {k: oct(m) for k, m in modes.items()}
