"""A hostile tenant against the agents' services (metadata service, MCP, streaming
exec), on the real daemon: what one workspace or member does must not cost
another, nor the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Daemon
from tests.workspaces.conftest import NETNS, Users, create, wait_for
from tests.workspaces.test_metadata import ask_raw


@pytest.fixture(scope="module")
def two(
    pool_daemon: Daemon, bb_image: str
) -> Iterator[tuple[Daemon, dict[str, Any], dict[str, Any]]]:
    d = pool_daemon
    u = Users(d)
    try:
        owner = u.make()
        a = create(d, owner, "ha", image=bb_image)
        b = create(d, owner, "hb", image=bb_image)
        yield d, a, b
    finally:
        u.cleanup()


HOLD = r"""
import socket, sys
held = []
for _ in range(int(sys.argv[1])):
    try:
        held.append(socket.create_connection(("169.254.169.254", 80), timeout=5))
    except OSError:
        pass
print(len(held), flush=True)
sys.stdin.read()
"""


def fds(d: Daemon) -> int:
    assert d.proc is not None
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def test_metadata_connections_a_workspace_holds_are_capped(two: Any) -> None:
    """Each connection to the metadata service is a descriptor in the daemon: a
    workspace holding hundreds open must not take the daemon's (shared by all)."""
    d, a, b = two
    assert ask_raw(d, a["id"], "GET", "/v1/identity")[0] == 200
    before = fds(d)
    netns = NETNS / f"den{d.instance}-{a['id']}"
    hold = subprocess.Popen(
        ["nsenter", f"--net={netns}", sys.executable, "-c", HOLD, "400"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert hold.stdout is not None
        hold.stdout.readline()
        # den accepts what the kernel queued; the cap closes the rest at once
        wait_for(lambda: fds(d) - before < 200, 10)
        assert fds(d) - before < 200
        # another workspace is served all the while
        assert ask_raw(d, b["id"], "GET", "/v1/identity")[0] == 200
    finally:
        hold.kill()
        hold.wait()
    wait_for(lambda: ask_raw(d, a["id"], "GET", "/v1/identity")[0] == 200, 10)


FLOOD = r"""
import http.client, sys
codes = {}
conn = http.client.HTTPConnection("169.254.169.254", 80, timeout=10)
for _ in range(int(sys.argv[1])):
    conn.request("GET", "/v1/identity")
    resp = conn.getresponse()
    resp.read()
    codes[resp.status] = codes.get(resp.status, 0) + 1
    if resp.status == 429:
        retry = resp.getheader("Retry-After")
print(codes.get(200, 0), codes.get(429, 0), retry if codes.get(429) else "", flush=True)
"""


def test_a_workspace_flooding_its_metadata_service_is_slowed_alone(two: Any) -> None:
    """Requests past a workspace's rate get 429 with Retry-After; another
    workspace is answered meanwhile."""
    d, a, b = two
    netns = NETNS / f"den{d.instance}-{a['id']}"
    out = subprocess.run(
        ["nsenter", f"--net={netns}", sys.executable, "-c", FLOOD, "600"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    ok, refused = int(out[0]), int(out[1])
    assert ok >= 200 and refused > 0, out  # the burst, then the rate
    assert int(out[2]) >= 1
    assert ask_raw(d, b["id"], "GET", "/v1/identity")[0] == 200
