"""Sessions: listed with user, workspace, kind, client and bytes; killed at once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.ssh.conftest import Person


def _wait_session(p: Person, who: str, kind: str, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in p.d.call("session.list", user=who):
            if kind in str(s["kind"]):
                return dict(s)
        time.sleep(0.1)
    raise AssertionError(f"no {kind} session of {who}")


def test_list_and_kill(alice: Person, bob: Person, ws: str) -> None:
    proc = subprocess.Popen(
        ["ssh", *alice.opts(), f"{ws}@127.0.0.1", "echo started; sleep 300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        s = _wait_session(alice, alice.name, "exec")
        assert s["workspace"] == f"{alice.name}/{ws}"
        assert str(s["client"]).startswith("127.0.0.1:")
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        # Members see their own sessions only, and cannot end others'.
        assert bob.d.call_as(bob.name, "session.list")["result"] == []
        err = bob.d.call_as(bob.name, "session.kill", {"id": s["id"]})
        assert err["error"]["code"] == -32001
        as_member = alice.ssh("den", "sessions", "--json")
        assert s["id"] in as_member.stdout
        killed = alice.ssh("den", "kill", str(s["id"]))
        assert killed.returncode == 0, killed.stderr
        proc.wait(1)  # closed within a second
        assert all(x["id"] != s["id"] for x in alice.d.call("session.list"))
    finally:
        proc.kill()
        proc.wait()


def test_kill_every_session_of_a_user(alice: Person, ws: str) -> None:
    procs = [
        subprocess.Popen(
            ["ssh", *alice.opts(), f"{ws}@127.0.0.1", "sleep 300"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 20
        while len(alice.d.call("session.list", user=alice.name)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        res = alice.d.call("session.kill", user=alice.name)
        assert len(res["killed"]) == 2
        for p in procs:
            p.wait(5)
        assert alice.d.call("session.list", user=alice.name) == []
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_killed_sftp_session_leaves_no_server(alice: Person, ws: str) -> None:
    sftp_opts = [o if o != "-p" else "-P" for o in alice.opts()]
    proc = subprocess.Popen(
        ["sftp", *sftp_opts, f"{ws}@127.0.0.1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ws_id = alice.d.call("workspace.get", ref=f"{alice.name}/{ws}")["id"]
    procs = Path(f"/sys/fs/cgroup/pids/den{alice.d.instance}/{ws_id}/cgroup.procs")

    def workers() -> list[str]:
        found = []
        for pid in procs.read_text().split():
            try:
                if b"sftp_worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass
        return found

    try:
        s = _wait_session(alice, alice.name, "sftp")
        deadline = time.monotonic() + 10
        while not workers():
            assert time.monotonic() < deadline, "no sftp worker in the workspace's cgroup"
            time.sleep(0.1)
        alice.d.call("session.kill", id=s["id"])
        # The sftp client notices only at its next command; the session is gone at once.
        time.sleep(1)
        assert all(x["id"] != s["id"] for x in alice.d.call("session.list"))
        deadline = time.monotonic() + 5
        while workers():
            assert time.monotonic() < deadline, "the sftp worker outlived its session"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
