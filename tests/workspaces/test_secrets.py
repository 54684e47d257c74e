"""Exec input stays secret: not on a host command line, not in the audit log or the database."""

from __future__ import annotations

import json
import secrets
from typing import Any

from tests.conftest import Daemon
from tests.helpers.cmdlines import watch_while
from tests.workspaces.conftest import BB, Users, create, run


def test_exec_env_is_not_on_any_host_command_line(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "ps", image=BB)
    env_secret = f"envsecret{secrets.token_hex(8)}"
    arg_secret = f"argsecret{secrets.token_hex(8)}"
    result: dict[str, Any] = {}

    def go() -> None:
        result.update(
            run(
                d,
                ws["ref"],
                "sh",
                "-c",
                f'sleep 3; echo "$TOKEN" >/dev/null; : {arg_secret}',
                env={"TOKEN": env_secret, "OTHER": "x"},
                stdin="stdin secret\n",
            )
        )

    # The command itself is in the process spec too, not in crun's argv.
    seen_crun_exec = watch_while(go, 2.5, env_secret.encode(), arg_secret.encode(), join=30)
    assert seen_crun_exec, "the exec was never seen running"
    assert result["exit_code"] == 0, result


def test_exec_input_is_not_in_the_audit_log(
    pool_daemon: Daemon, bb_image: str, users: Users
) -> None:
    d = pool_daemon
    owner = users.make()
    ws = create(d, owner, "aud", image=BB)
    env_secret = f"envsecret{secrets.token_hex(8)}"
    arg_secret = f"argsecret{secrets.token_hex(8)}"
    in_secret = f"stdinsecret{secrets.token_hex(8)}"
    res = run(
        d,
        ws["ref"],
        "sh",
        "-c",
        f'cat >/dev/null; test "$API_KEY" = {env_secret} && echo {arg_secret} >/dev/null',
        env={"API_KEY": env_secret},
        stdin=in_secret,
    )
    assert res["exit_code"] == 0, res
    # The den CLI too (same registry, same audit), and a call whose params fail validation.
    cli = d.cli(
        "exec", ws["ref"], "--env", json.dumps({"API_KEY": env_secret}), "--", "echo", arg_secret
    )
    assert cli.returncode == 0, cli.stderr
    bad = d.call_as(
        owner, "workspace.exec", {"ref": ws["ref"], "argv": ["echo", arg_secret], "timeout": -1}
    )
    assert bad["error"]["code"] == -32602, bad

    # (`den exec` streams: workspace.exec_stream, audited the same way.)
    out = d.cli("audit", "--json", "--limit", "20", check=True).stdout
    events = [e for e in json.loads(out) if e["method"].startswith("workspace.exec")]
    assert len(events) >= 3
    for secret in (env_secret, arg_secret, in_secret):
        assert secret not in out
    ours = next(e for e in events if e["params"].get("stdin") == f"<{len(in_secret)} bytes>")
    assert ours["params"]["env"] == {"API_KEY": f"<{len(env_secret)} bytes>"}
    assert ours["params"]["argv"][0] == "sh"
    # Nor anywhere in the database's files (the WAL included).
    for f in d.data_dir.glob("den.db*"):
        data = f.read_bytes()
        for secret in (env_secret, arg_secret, in_secret):
            assert secret.encode() not in data, (f, secret)
