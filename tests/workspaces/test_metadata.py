"""The metadata service at 169.254.169.254 inside workspaces, on the real daemon.

One owner with two workspaces (A and B): what A reads from inside is A's; A's
scoped token execs in A, is refused on B and on list methods; an address of
B's put on A's veth by host root and used as the source still gets A's
answers; env values reach neither the daemon's log nor the audit log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from den.cli.client import RpcError
from tests.conftest import Daemon, ssh_key
from tests.workspaces.conftest import NETNS, Users, create, ok, sh

META = "http://169.254.169.254"
# What /v1/token, /v1/env and /v1/busy writes need (a forged request has no say in it).
GET = 'wget -qO- --header "Den-Metadata: true"'
SECRET = "s3cr3t-V4lue-that-must-not-leak"


class Pair:
    def __init__(self, d: Daemon, owner: str, a: dict[str, Any], b: dict[str, Any]) -> None:
        self.d, self.owner, self.a, self.b = d, owner, a, b


@pytest.fixture(scope="module")
def pair(
    pool_daemon: Daemon, bb_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    d = pool_daemon
    u = Users(d)
    try:
        owner = u.make()
        _, pub = ssh_key(tmp_path_factory.mktemp("k"), "meta")
        d.call("key.add", user=owner, key=pub)
        a = create(d, owner, "ma", image=bb_image)
        b = create(d, owner, "mb", image=bb_image)
        yield Pair(d, owner, a, b)
    finally:
        u.cleanup()


def rpc_inside(
    d: Daemon, ref: str, tok: str, method: str, params: dict[str, Any]
) -> dict[str, Any]:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    out = ok(
        d,
        ref,
        'wget -qO- --header "Authorization: Bearer $T" --post-data "$B" ' + META + "/v1/rpc",
        env={"T": tok, "B": body},
    )
    reply: dict[str, Any] = json.loads(out)
    return reply


def token_of(d: Daemon, ref: str) -> str:
    return str(json.loads(ok(d, ref, f"{GET} {META}/v1/token"))["token"])


def test_identity_keys_and_env_from_inside(pair: Pair) -> None:
    d, ref = pair.d, pair.a["ref"]
    d.call("env.set", ref=ref, env=[f"API_KEY={SECRET}", "MODE=a b 'c'"])
    d.call("env.set", ref=f"{pair.owner}/*", env=["SHARED=all", "MODE=user"])
    ident = json.loads(ok(d, ref, f"wget -qO- {META}/v1/identity"))
    assert ident["workspace"] == "ma" and ident["owner"] == pair.owner
    assert ident["id"] == pair.a["id"]
    keys = ok(d, ref, f"wget -qO- {META}/v1/keys")
    assert keys.startswith("ssh-ed25519 ") and keys.count("\n") == 1
    env = json.loads(ok(d, ref, f"{GET} {META}/v1/env"))
    # the workspace's own value wins over the owner's
    assert env == {"API_KEY": SECRET, "MODE": "a b 'c'", "SHARED": "all"}
    # B gets the owner's variables only
    assert json.loads(ok(d, pair.b["ref"], f"{GET} {META}/v1/env")) == {
        "SHARED": "all",
        "MODE": "user",
    }
    sourced = ok(d, ref, f"{GET} '{META}/v1/env?format=sh' > /tmp/e; . /tmp/e; echo \"$MODE\"")
    assert sourced == "a b 'c'\n"
    # ls masks unless asked; rm removes
    listed = {r["key"]: r for r in d.call("env.list", ref=ref)}
    assert listed["API_KEY"]["value"] == "***" and listed["SHARED"]["scope"] == "user"
    revealed = {r["key"]: r["value"] for r in d.call("env.list", ref=ref, reveal=True)}
    assert revealed["API_KEY"] == SECRET
    # the CLI: KEY=VALUE arguments, or lines from stdin (off the command line)
    d.cli("env", "set", ref, "CLI_VAR=1", check=True)
    d.cli("env", "set", ref, "--from-file", "-", input="export FROM_STDIN=x y\n", check=True)
    shown = d.cli("env", "ls", ref, check=True).stdout
    assert "CLI_VAR" in shown and "FROM_STDIN" in shown and SECRET not in shown
    env = json.loads(ok(d, ref, f"{GET} {META}/v1/env"))
    assert env["CLI_VAR"] == "1" and env["FROM_STDIN"] == "x y"
    d.call("env.remove", ref=ref, key="MODE")
    assert json.loads(ok(d, ref, f"{GET} {META}/v1/env"))["MODE"] == "user"
    # another member sees none of it
    other = Users(d)
    try:
        stranger = other.make()
        assert d.call_as(stranger, "env.list", {"ref": ref})["error"]["code"] == -32001
    finally:
        other.cleanup()
    # never in the daemon's log, the audit log has key names only
    assert SECRET not in d.log_text()
    c = d.client()
    try:
        events = c.call("audit.list", {"method": "env.set", "target": f"workspace:{ref}"})
    finally:
        c.close()
    assert events and SECRET not in json.dumps(events)
    audited = json.dumps([e["params"] for e in events])
    assert "API_KEY" in audited and "FROM_STDIN" in audited and "x y" not in audited


def test_scoped_token_reaches_its_own_workspace_only(pair: Pair) -> None:
    d, a, b = pair.d, pair.a["ref"], pair.b["ref"]
    tok = token_of(d, a)
    got = rpc_inside(d, a, tok, "workspace.exec", {"ref": "ma", "argv": ["echo", "inside"]})
    assert got["result"]["stdout"] == "inside\n", got
    # ?format=text: the token alone, for $(...) in a shell
    plain = ok(d, a, f"{GET} '{META}/v1/token?format=text'").strip()
    assert plain.startswith("denws_") and "{" not in plain
    got = rpc_inside(d, a, plain, "workspace.get", {"ref": "ma"})
    assert got["result"]["name"] == "ma", got
    refused = rpc_inside(d, a, tok, "workspace.exec", {"ref": "mb", "argv": ["true"]})
    assert refused["error"]["code"] == -32001 and "only its own" in refused["error"]["message"]
    listed = rpc_inside(d, a, tok, "workspace.list", {})
    assert listed["error"]["code"] == -32003, listed
    admin = rpc_inside(d, a, tok, "token.create", {})
    assert admin["error"]["code"] == -32003, admin
    # A's token in B's metadata service: refused (it is not B's)
    res = sh(
        d,
        b,
        'wget -qO- --header "Authorization: Bearer $T" --post-data "{}" ' + META + "/v1/rpc",
        env={"T": tok},
    )
    assert res["exit_code"] != 0 and "403" in res["stderr"]
    # and a token is not a den API token on den's own listener
    with pytest.raises(RpcError):
        d.client(token=tok, tcp=True).call("workspace.get", {"ref": a})


SPOOF = r"""
import json, socket, sys
src, path = sys.argv[1], sys.argv[2]
s = socket.socket()
s.bind((src, 0))
s.connect(("169.254.169.254", 80))
s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\nDen-Metadata: true\r\n\r\n".encode())
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b"\r\n\r\n", 1)[1].decode())
"""


def test_the_workspace_keeps_its_own_ports_80_and_25(pair: Pair) -> None:
    """The service takes no port a workspace's own servers bind on every address
    (a web server on 0.0.0.0:80, a mail server on :25), and answers meanwhile."""
    d, ref = pair.d, pair.a["ref"]
    ok(d, ref, "mkdir -p /tmp/www && echo own > /tmp/www/index.html")
    try:
        ok(
            d,
            ref,
            "busybox httpd -p 0.0.0.0:80 -h /tmp/www && busybox httpd -p 0.0.0.0:25 -h /tmp/www",
        )
        assert ok(d, ref, "wget -qO- http://127.0.0.1:80/") == "own\n"
        assert ok(d, ref, "wget -qO- http://127.0.0.1:25/") == "own\n"
        ident = json.loads(ok(d, ref, f"wget -qO- {META}/v1/identity"))
        assert ident["id"] == pair.a["id"]
    finally:
        sh(d, ref, "pkill httpd")


def test_a_spoofed_source_address_still_gets_its_own_answers(pair: Pair) -> None:
    d, a, b = pair.d, pair.a, pair.b
    netns = NETNS / f"den{d.instance}-{a['id']}"
    ns = ["nsenter", f"--net={netns}"]
    subprocess.run([*ns, "ip", "addr", "add", f"{b['address']}/32", "dev", "eth0"], check=True)
    try:

        def ask(path: str) -> Any:
            out = subprocess.run(
                [*ns, sys.executable, "-c", SPOOF, b["address"], path],
                capture_output=True,
                text=True,
                check=True,
                timeout=20,
            )
            return json.loads(out.stdout)

        assert ask("/v1/identity")["workspace"] == "ma"
        tok = ask("/v1/token")["token"]
    finally:
        subprocess.run([*ns, "ip", "addr", "del", f"{b['address']}/32", "dev", "eth0"], check=False)
    # the token it got is A's: good in A, nothing in B
    assert rpc_inside(d, a["ref"], tok, "workspace.get", {"ref": "ma"})["result"]["name"] == "ma"
    assert rpc_inside(d, a["ref"], tok, "workspace.get", {"ref": "mb"})["error"]["code"] == -32001


def test_listener_follows_stop_start_and_a_deleted_workspace_token_dies(
    pair: Pair, bb_image: str
) -> None:
    d = pair.d
    ws = create(d, pair.owner, "mc", image=bb_image)
    ref = ws["ref"]
    tok = token_of(d, ref)
    d.call("workspace.stop", ref=ref)
    d.call("workspace.start", ref=ref)
    assert json.loads(ok(d, ref, f"wget -qO- {META}/v1/identity"))["workspace"] == "mc"
    d.call("workspace.delete", ref=ref)
    # the deleted workspace's token is refused (asked through A's service)
    res2 = sh(
        d,
        pair.a["ref"],
        'wget -qO- --header "Authorization: Bearer $T" --post-data "{}" ' + META + "/v1/rpc",
        env={"T": tok},
    )
    assert res2["exit_code"] != 0 and "401" in res2["stderr"]


RAW = r"""
import socket, sys
s = socket.create_connection(("169.254.169.254", 80), timeout=10)
s.sendall(sys.argv[1].encode().replace(b"\n", b"\r\n"))
data = b""
while chunk := s.recv(65536):
    data += chunk
sys.stdout.write(data.decode())
"""


def ask_raw(d: Daemon, ws_id: str, method: str, path: str, *headers: str) -> tuple[int, str]:
    """(status, body) of one request made in the workspace's netns (from the host)."""
    netns = NETNS / f"den{d.instance}-{ws_id}"
    req = f"{method} {path} HTTP/1.0\nHost: 169.254.169.254\nContent-Length: 0\n"
    req += "".join(h + "\n" for h in headers) + "\n"
    out = subprocess.run(
        ["nsenter", f"--net={netns}", sys.executable, "-c", RAW, req],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout
    head, _, body = out.partition("\n\n")
    return int(head.split()[1]), body


def test_secrets_need_the_metadata_header_and_no_forwarding(pair: Pair) -> None:
    """A request an SSRF hole (or a proxy) inside makes gets no token, env or lease."""
    d, a = pair.d, pair.a
    d.call("env.set", ref=a["ref"], env=[f"HDR_KEY={SECRET}"])
    for method, path in (("GET", "/v1/token"), ("GET", "/v1/env"), ("POST", "/v1/busy?for=5m")):
        status, body = ask_raw(d, a["id"], method, path)
        assert status == 403 and "Den-Metadata: true" in body, (path, body)
        assert SECRET not in body and "denws_" not in body
        status, body = ask_raw(d, a["id"], method, path, "Den-Metadata: false")
        assert status == 403, (path, body)
        for fwd in ("X-Forwarded-For: 10.0.0.9", "Forwarded: for=10.0.0.9"):
            status, body = ask_raw(d, a["id"], method, path, "Den-Metadata: true", fwd)
            assert status == 403 and fwd.split(":")[0] in body, (path, body)
    assert ask_raw(d, a["id"], "DELETE", "/v1/busy")[0] == 403
    assert d.call("workspace.get", ref=a["ref"])["busy_until"] is None
    status, body = ask_raw(d, a["id"], "GET", "/v1/env", "Den-Metadata: true")
    assert status == 200 and json.loads(body)["HDR_KEY"] == SECRET
    # what names no secret stays open; the index says what to send
    assert ask_raw(d, a["id"], "GET", "/v1/identity")[0] == 200
    assert ask_raw(d, a["id"], "GET", "/v1/busy")[0] == 200
    status, index = ask_raw(d, a["id"], "GET", "/")
    assert status == 200 and "Den-Metadata: true" in index and "X-Forwarded-For" in index
