"""ssh SetEnv values and commands never reach a host command line (``ps``)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from tests.helpers.cmdlines import watch_while
from tests.ssh.conftest import Person


def test_setenv_is_not_on_any_host_command_line(alice: Person, ws: str, tmp_path: Path) -> None:
    env_secret = f"envsecret{secrets.token_hex(8)}"
    # In a config file, so that not even the ssh client's own argv holds it.
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"SetEnv LC_TOKEN={env_secret}\n")  # LC_*: always accepted
    result: dict[str, Any] = {}

    def go() -> None:
        res = alice.ssh(ws, 'sleep 3; test -n "$LC_TOKEN" && echo set', args=("-F", str(cfg)))
        result.update(rc=res.returncode, out=res.stdout, err=res.stderr)

    seen_crun_exec = watch_while(go, 3, env_secret.encode(), b"sleep 3")
    assert seen_crun_exec, "the session was never seen running"
    assert result["rc"] == 0 and result["out"] == "set\n", result
