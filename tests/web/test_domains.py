"""Custom domains at the RPC and CLI level, against the real daemon resolving through a
real DNS server the test runs on loopback (DEN_DNS_SERVERS).

The gate's questions (:func:`den.services.domains.domain_target`,
:func:`challenge_answer`) are asked on the daemon's own database; serving a
verified name through Caddy is the gate's tests' part.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import pytest

from den.cli.client import RpcError
from den.config import Settings
from den.db.engine import make_engine, sessionmaker
from den.services import domains
from den.web.labels import label
from tests.conftest import Daemon
from tests.helpers.dns import DnsServer, dns_server
from tests.workspaces.conftest import BB, Users, create, invalid, make_users, own_daemon

if TYPE_CHECKING:
    from den.app import App


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with dns_server() as server:
        yield server


@pytest.fixture(scope="module")
def d(dns: DnsServer) -> Iterator[Daemon]:
    env = {"DEN_DNS_SERVERS": json.dumps([dns.address]), "DEN_DEFAULT_IMAGE": BB}
    with own_daemon(env) as daemon:
        yield daemon


@pytest.fixture
def users(d: Daemon) -> Iterator[Users]:
    with make_users(d) as u:
        yield u


def name() -> str:
    return f"app-{secrets.token_hex(3)}.example.com"


def as_user(d: Daemon, user: str, method: str, **params: Any) -> Any:
    res = d.call_as(user, method, params)
    assert "result" in res, res
    return res["result"]


def err_as(d: Daemon, user: str, method: str, **params: Any) -> dict[str, Any]:
    res = d.call_as(user, method, params)
    assert "error" in res, res
    return cast(dict[str, Any], res["error"])


def err(d: Daemon, method: str, **params: Any) -> RpcError:
    with pytest.raises(RpcError) as info:
        d.call(method, **params)
    return info.value


class _Db:
    """What the gate's questions use of an App: the daemon's database, one generation."""

    web_generation = 0

    def __init__(self, d: Daemon) -> None:
        self.engine = make_engine(f"sqlite+aiosqlite:///{d.data_dir / 'den.db'}")
        self.sessions = sessionmaker(self.engine)


def gate(d: Daemon, fn: str, *args: str) -> Any:
    async def run() -> Any:
        db = _Db(d)
        try:
            return await getattr(domains, fn)(cast("App", db), *args)
        finally:
            await db.engine.dispose()

    return asyncio.run(run())


@pytest.fixture
def owner(d: Daemon, users: Users) -> str:
    user = users.make()
    create(d, user, "site")
    return user


# -- TXT ------------------------------------------------------------------------------


def test_txt_verification_then_served(d: Daemon, dns: DnsServer, owner: str) -> None:
    dom = name()
    ws_id = d.call("workspace.get", ref=f"{owner}/site")["id"]
    added = as_user(d, owner, "domain.add", ref="site", domain=dom.upper() + ".")
    assert added["domain"] == dom  # uppercase and the final dot normalised
    assert added["state"] == "pending" and added["workspace"] == f"{owner}/site"
    token = added["token"]
    assert token and len(token) >= 40
    host = f"{label(owner, 'site')}.den.localhost"
    records = {(r["type"], r["name"]): r["value"] for r in added["records"]}
    assert records[("CNAME", dom)] == host
    assert records[("A", dom)] == "127.0.0.1"  # where *.localhost URLs are
    assert records[("TXT", f"_den-challenge.{dom}")] == token
    text = added["instructions"]
    assert f"CNAME {dom} -> {host}" in text and f"_den-challenge.{dom} = {token}" in text
    assert f"den domain verify {dom}" in text

    # Pending: not served; only the challenge path of this token is answered.
    assert gate(d, "domain_target", dom) is None
    assert gate(d, "challenge_answer", dom, f"/.well-known/den-challenge/{token}") == token
    assert gate(d, "challenge_answer", dom, "/.well-known/den-challenge/x" + token) is None
    assert gate(d, "challenge_answer", dom, "/") is None

    # No record: refused, saying what to create.
    e = err_as(d, owner, "domain.verify", domain=dom, check="txt")
    assert e["code"] == -32002
    assert f"no TXT record _den-challenge.{dom} found" in e["message"]
    assert token in e["message"]
    # A wrong one: refused, saying what it holds.
    dns.set(f"_den-challenge.{dom}", "TXT", "not-the-token")
    e = err_as(d, owner, "domain.verify", domain=dom, check="txt")
    assert "holds 'not-the-token'" in e["message"] and token in e["message"]
    assert as_user(d, owner, "domain.list")[0]["state"] == "pending"
    assert gate(d, "domain_target", dom) is None

    # The right one (among others): verified, then served.
    dns.set(f"_den-challenge.{dom}", "TXT", "v=spf1 -all", token)
    done = as_user(d, owner, "domain.verify", domain=dom)
    assert done["state"] == "verified" and done["verified_by"] == "txt"
    assert done["token"] is None and done["url"] == f"https://{dom}:{8443 + d.instance}/"
    assert gate(d, "domain_target", dom) == (ws_id, None)
    assert gate(d, "domain_target", dom.upper() + ".") == (ws_id, None)
    assert gate(d, "domain_target", f"{dom}:443") == (ws_id, None)
    # A verified name is the workspace's: the challenge path is no longer den's.
    assert gate(d, "challenge_answer", dom, f"/.well-known/den-challenge/{token}") is None
    # The TXT record may go: verification is not undone (again: the same answer).
    dns.clear(f"_den-challenge.{dom}")
    assert as_user(d, owner, "domain.verify", domain=dom)["state"] == "verified"
    listed = as_user(d, owner, "domain.list")
    assert [(x["domain"], x["state"]) for x in listed] == [(dom, "verified")]

    removed = as_user(d, owner, "domain.remove", domain=dom)
    assert removed["domain"] == dom
    assert as_user(d, owner, "domain.list") == []
    assert gate(d, "domain_target", dom) is None


def test_auto_tries_txt_then_http(d: Daemon, owner: str) -> None:
    dom = name()
    as_user(d, owner, "domain.add", ref="site", domain=dom)
    # NXDOMAIN for the name itself is "no record", not a failure.
    e = err_as(d, owner, "domain.verify", domain=dom)
    assert "no TXT record" in e["message"]
    # auto tried the HTTP challenge too, and says why it failed.
    assert f"could not fetch http://{dom}/.well-known/den-challenge/" in e["message"]
    assert "no address record" in e["message"]


def test_dns_timeout_is_explained() -> None:
    """A nameserver that never answers: the check says so and names it, within seconds."""
    settings = Settings(dns_servers=["127.0.0.1:9"])
    why = asyncio.run(domains._check_txt(settings, "example.com", "tok"))
    assert why == (
        "DNS did not answer for _den-challenge.example.com within 3 s "
        "(nameservers Do53:127.0.0.1@9)"
    )


# -- HTTP challenge -------------------------------------------------------------------


class _Site:
    """A web server on port 80 of an address of its own in 127/8, answering ``pages``."""

    def __init__(self) -> None:
        self.addr = f"127.{secrets.randbelow(200) + 20}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}"
        self.pages: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.hosts: list[str] = []
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.hosts.append(self.headers.get("Host", ""))
                status, headers, body = site.pages.get(self.path, (404, {}, b"no"))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((self.addr, 80), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def site() -> Iterator[_Site]:
    s = _Site()
    try:
        yield s
    finally:
        s.close()


def test_http_challenge(d: Daemon, dns: DnsServer, owner: str, site: _Site) -> None:
    dom = name()
    token = as_user(d, owner, "domain.add", ref="site", domain=dom, port=3000)["token"]
    path = f"/.well-known/den-challenge/{token}"
    # The claimant writes the records: den does not fetch from private or link-local
    # addresses (the LAN, cloud metadata, workspaces), which the egress firewall closes.
    for private in ("10.1.2.3", "169.254.169.254", "192.168.1.1"):
        dns.set(dom, "A", private)
        e = err_as(d, owner, "domain.verify", domain=dom, check="http")
        assert f"{dom} resolves to {private}: private or reserved" in e["message"]
    dns.set(dom, "A", site.addr)

    # Nothing there yet: the status is named.
    e = err_as(d, owner, "domain.verify", domain=dom, check="http")
    assert f"http://{dom}{path} answered HTTP 404" in e["message"]
    # Something else than the token.
    site.pages[path] = (200, {}, b"hello")
    e = err_as(d, owner, "domain.verify", domain=dom, check="http")
    assert "something other than the token" in e["message"]
    # A redirect to another host proves nothing.
    site.pages[path] = (302, {"Location": f"http://elsewhere.example.net{path}"}, b"")
    e = err_as(d, owner, "domain.verify", domain=dom, check="http")
    assert "another host or port" in e["message"]
    # A redirect on the same name is followed.
    site.pages[path] = (301, {"Location": f"{path}/"}, b"")
    site.pages[path + "/"] = (200, {}, token.encode() + b"\n")
    done = as_user(d, owner, "domain.verify", domain=dom, check="http")
    assert done["state"] == "verified" and done["verified_by"] == "http" and done["port"] == 3000
    assert set(site.hosts) == {dom}  # asked by name, through the test's DNS
    ws_id = d.call("workspace.get", ref=f"{owner}/site")["id"]
    assert gate(d, "domain_target", dom) == (ws_id, 3000)
    as_user(d, owner, "domain.remove", domain=dom)


# -- bad input, claims and rights ---------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("127.0.0.1", "IP address"),
        ("[::1]", "IP address"),
        ("localhost", "single label"),
        ("app.localhost", ".localhost"),
        ("printer.local", ".local"),
        ("x.den.localhost", "den's own domain"),
        ("den.localhost", "den's own domain"),
        ("shop", "single label"),
        ("a..example.com", "label ''"),
        ("-a.example.com", "label '-a'"),
        ("a_b.example.com", "label 'a_b'"),
        ("*.example.com", "wildcard"),
        ("bücher.example", "xn--"),
        ("1.2.3.4.5", "numeric"),
        ("a" * 64 + ".example.com", "1 to 63"),
        ("", "give a domain name"),
    ],
)
def test_bad_names(d: Daemon, owner: str, value: str, says: str) -> None:
    msg = invalid(d, "domain.add", "domain", ref=f"{owner}/site", domain=value)
    assert says in msg, msg


def test_bad_port_and_workspace(d: Daemon, owner: str) -> None:
    invalid(d, "domain.add", "port", ref=f"{owner}/site", domain=name(), port=0)
    invalid(d, "domain.add", "port", ref=f"{owner}/site", domain=name(), port=70000)
    assert err(d, "domain.add", ref=f"{owner}/nope", domain=name()).code == -32001


def test_claims_and_rights(d: Daemon, dns: DnsServer, users: Users, owner: str) -> None:
    other = users.make()
    create(d, other, "web")
    dom = name()
    first = as_user(d, owner, "domain.add", ref="site", domain=dom)
    # Adding it again to the same workspace: the same claim and token, a new port.
    again = as_user(d, owner, "domain.add", ref="site", domain=dom, port=9000)
    assert again["token"] == first["token"] and again["port"] == 9000

    # Another workspace cannot take a pending claim (and learns nothing of its owner).
    e = err_as(d, other, "domain.add", ref="web", domain=dom)
    assert e["code"] == -32002 and "claimed by another workspace" in e["message"]
    assert "lapses at" in e["message"] and owner not in e["message"]
    # Nor someone else's workspace, nor their claim.
    assert err_as(d, other, "domain.add", ref=f"{owner}/site", domain=name())["code"] == -32001
    assert err_as(d, other, "domain.verify", domain=dom)["code"] == -32001
    assert err_as(d, other, "domain.remove", domain=dom)["code"] == -32001
    assert as_user(d, other, "domain.list") == []
    assert as_user(d, other, "domain.list", all=True) == []
    assert err_as(d, other, "domain.list", ref=f"{owner}/site")["code"] == -32001
    # A read-only token cannot claim.
    tok = as_user(d, other, "token.create", right="read")
    with contextlib.closing(d.client(token=tok["token"])) as c, pytest.raises(RpcError) as info:
        c.call("domain.add", {"ref": "web", "domain": name()})
    assert info.value.code == -32003

    # Once verified, the name stays the owner's.
    dns.set(f"_den-challenge.{dom}", "TXT", first["token"])
    as_user(d, owner, "domain.verify", domain=dom)
    e = err_as(d, other, "domain.add", ref="web", domain=dom)
    assert "claimed by another workspace (verified)" in e["message"]
    assert "serves" in err_as(d, owner, "domain.add", ref="site", domain=dom)["message"]
    # Admins see every claim and may remove any.
    assert dom in [x["domain"] for x in d.call("domain.list", all=True)]
    assert [x["domain"] for x in d.call("domain.list", ref=f"{owner}/site")] == [dom]
    d.call("domain.remove", domain=dom)
    # Freed: the other workspace may claim it now, with a token of its own.
    taken = as_user(d, other, "domain.add", ref="web", domain=dom)
    assert taken["token"] != first["token"] and taken["workspace"] == f"{other}/web"
    # Deleting the workspace drops its claims.
    d.call("workspace.delete", ref=f"{other}/web")
    assert dom not in [x["domain"] for x in d.call("domain.list", all=True)]
    dns.clear(f"_den-challenge.{dom}")


def test_stale_pending_claim_lapses(d: Daemon, users: Users, owner: str) -> None:
    """A claim nobody verified within PENDING_HOLD may be taken by another workspace."""
    other = users.make()
    create(d, other, "web")
    dom = name()
    as_user(d, owner, "domain.add", ref="site", domain=dom)
    con = sqlite3.connect(d.data_dir / "den.db")
    try:
        con.execute(
            "UPDATE custom_domains SET created_at = datetime('now', '-2 days') WHERE domain = ?",
            (dom,),
        )
        con.commit()
    finally:
        con.close()
    taken = as_user(d, other, "domain.add", ref="web", domain=dom)
    assert taken["workspace"] == f"{other}/web"
    assert as_user(d, owner, "domain.list") == []


def test_cli(d: Daemon, dns: DnsServer, owner: str) -> None:
    dom = name()
    res = d.cli("domain", "add", "site", dom, user=owner, check=True)
    assert f"CNAME {dom} -> {label(owner, 'site')}.den.localhost" in res.stdout
    token = as_user(d, owner, "domain.list")[0]["token"]
    assert token in res.stdout
    res = d.cli("domain", "verify", dom, user=owner)
    assert res.returncode != 0 and f"no TXT record _den-challenge.{dom}" in res.stderr
    dns.set(f"_den-challenge.{dom}", "TXT", token)
    d.cli("domain", "verify", dom, "--check", "txt", user=owner, check=True)
    res = d.cli("domain", "ls", user=owner, check=True)
    assert dom in res.stdout and "verified" in res.stdout
    d.cli("domain", "rm", dom, user=owner, check=True)
    assert dom not in d.cli("domain", "ls", user=owner, check=True).stdout
    dns.clear(f"_den-challenge.{dom}")
