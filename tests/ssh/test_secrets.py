"""ssh SetEnv values and commands never reach a host command line (``ps``)."""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any

from tests.ssh.conftest import Person
from tests.workspaces.test_secrets import host_cmdlines


def test_setenv_is_not_on_any_host_command_line(alice: Person, ws: str, tmp_path: Path) -> None:
    env_secret = f"envsecret{secrets.token_hex(8)}"
    # In a config file, so that not even the ssh client's own argv holds it.
    cfg = tmp_path / "ssh_config"
    cfg.write_text(f"SetEnv TOKEN={env_secret}\n")
    result: dict[str, Any] = {}

    def go() -> None:
        res = alice.ssh(ws, 'sleep 3; test -n "$TOKEN" && echo set', args=("-F", str(cfg)))
        result.update(rc=res.returncode, out=res.stdout, err=res.stderr)

    t = threading.Thread(target=go)
    t.start()
    seen_crun_exec = False
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for pid, cmd in host_cmdlines().items():
                assert env_secret.encode() not in cmd, (pid, cmd)
                args = cmd.split(b"\0")
                if args[0].endswith(b"crun") and b"exec" in args:
                    seen_crun_exec = True
                    assert b"sleep 3" not in cmd, cmd
            time.sleep(0.02)
    finally:
        t.join(60)
    assert seen_crun_exec, "the session was never seen running"
    assert result["rc"] == 0 and result["out"] == "set\n", result
