"""Custom domains at the RPC and CLI level, against the real daemon resolving through a
real DNS server the test runs on loopback (DEN_DNS_SERVERS).

The gate's question (:func:`den.services.domains.domain_target`) is asked on
the daemon's own database; serving a verified name through Caddy is the gate's
tests' part.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import pytest

from den.cli.client import RpcError
from den.config import Settings
from den.services import domains
from den.web.labels import label
from tests.conftest import Daemon
from tests.helpers.dns import DnsServer, dns_server
from tests.web.conftest import call_gate
from tests.workspaces.conftest import BB, Users, create, invalid, make_users, own_daemon

if TYPE_CHECKING:
    pass


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


def gate(d: Daemon, fn: str, *args: str) -> Any:
    return call_gate(d, domains, fn, *args)


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
    assert {r["type"] for r in added["records"]} == {"CNAME", "A", "TXT"}
    text = added["instructions"]
    assert f"CNAME {dom} -> {host}" in text and f"_den-challenge.{dom} = {token}" in text
    assert f"den domain verify {dom}" in text
    assert "http" not in text.replace(f"https://{dom}", "")  # no HTTP challenge offered

    # Pending: not served.
    assert gate(d, "domain_target", dom) is None

    # No record: refused, saying what to create.
    e = err_as(d, owner, "domain.verify", domain=dom)
    assert e["code"] == -32002
    assert f"no TXT record _den-challenge.{dom} found" in e["message"]
    assert token in e["message"]
    # A wrong one: refused, saying what it holds.
    dns.set(f"_den-challenge.{dom}", "TXT", "not-the-token")
    e = err_as(d, owner, "domain.verify", domain=dom)
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
    # The TXT record may go: verification is not undone (again: the same answer).
    dns.clear(f"_den-challenge.{dom}")
    assert as_user(d, owner, "domain.verify", domain=dom)["state"] == "verified"
    listed = as_user(d, owner, "domain.list")
    assert [(x["domain"], x["state"]) for x in listed] == [(dom, "verified")]

    removed = as_user(d, owner, "domain.remove", domain=dom)
    assert removed["domain"] == dom
    assert as_user(d, owner, "domain.list") == []
    assert gate(d, "domain_target", dom) is None


def test_pointing_the_name_here_proves_nothing(d: Daemon, dns: DnsServer, owner: str) -> None:
    """A name that leads to this den (a wildcard or dangling record) is not verified by that:
    only the TXT record, which only the name's DNS owner can write, proves the claim."""
    dom = name()
    added = as_user(d, owner, "domain.add", ref="site", domain=dom)
    here = {r["value"] for r in added["records"] if r["type"] == "A"}
    assert here == {"127.0.0.1"}
    dns.set(dom, "A", *here)
    try:
        e = err_as(d, owner, "domain.verify", domain=dom)
        assert e["code"] == -32002
        assert f"no TXT record _den-challenge.{dom} found" in e["message"]
        assert as_user(d, owner, "domain.list")[0]["state"] == "pending"
        assert gate(d, "domain_target", dom) is None
        # Nor can a caller ask for another kind of check.
        assert err_as(d, owner, "domain.verify", domain=dom, check="http")["code"] == -32602
    finally:
        dns.clear(dom)
        as_user(d, owner, "domain.remove", domain=dom)


def test_dns_timeout_is_explained() -> None:
    """A nameserver that never answers: the check says so and names it, within seconds."""
    settings = Settings(dns_servers=["127.0.0.1:9"])
    why = asyncio.run(domains._check_txt(settings, "example.com", "tok"))
    assert why == (
        "DNS did not answer for _den-challenge.example.com within 3 s "
        "(nameservers Do53:127.0.0.1@9)"
    )


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
    # The name stays the owner's a while; an admin may still give it to the other
    # workspace, with a token of its own.
    assert "reserved" in err_as(d, other, "domain.add", ref="web", domain=dom)["message"]
    taken = d.call("domain.add", ref=f"{other}/web", domain=dom)
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
    d.cli("domain", "verify", dom, user=owner, check=True)
    res = d.cli("domain", "ls", user=owner, check=True)
    assert dom in res.stdout and "verified" in res.stdout
    d.cli("domain", "rm", dom, user=owner, check=True)
    assert dom not in d.cli("domain", "ls", user=owner, check=True).stdout
    dns.clear(f"_den-challenge.{dom}")


# -- a removed name stays its owner's a while -----------------------------------------


def reserved_until(message: str) -> datetime:
    m = re.search(r"reserved for them until (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", message)
    assert m, message
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M").replace(tzinfo=UTC)


def verified(d: Daemon, dns: DnsServer, user: str, ref: str, dom: str) -> None:
    token = as_user(d, user, "domain.add", ref=ref, domain=dom)["token"]
    dns.set(f"_den-challenge.{dom}", "TXT", token)
    try:
        assert as_user(d, user, "domain.verify", domain=dom)["state"] == "verified"
    finally:
        dns.clear(f"_den-challenge.{dom}")


def test_removed_name_stays_reserved(d: Daemon, dns: DnsServer, users: Users, owner: str) -> None:
    other = users.make()
    create(d, other, "web")
    create(d, owner, "blog")
    dom = name()
    verified(d, dns, owner, "site", dom)
    as_user(d, owner, "domain.remove", domain=dom)

    # Another owner is refused for 7 days, told until when (and not whose it was).
    e = err_as(d, other, "domain.add", ref="web", domain=dom)
    assert e["code"] == -32002 and owner not in e["message"]
    until = reserved_until(e["message"])
    soon = datetime.now(UTC) + timedelta(days=7)
    assert soon - timedelta(minutes=2) < until <= soon
    assert as_user(d, other, "domain.list") == []
    # The owner may add it again, to any of their workspaces.
    again = as_user(d, owner, "domain.add", ref="blog", domain=dom)
    assert again["workspace"] == f"{owner}/blog" and again["state"] == "pending"
    # Removing a claim that was never verified does not end (or start) a hold.
    as_user(d, owner, "domain.remove", domain=dom)
    assert "reserved" in err_as(d, other, "domain.add", ref="web", domain=dom)["message"]
    undone = name()
    as_user(d, owner, "domain.add", ref="site", domain=undone)
    as_user(d, owner, "domain.remove", domain=undone)
    as_user(d, other, "domain.add", ref="web", domain=undone)
    as_user(d, other, "domain.remove", domain=undone)

    # Once the hold lapses, anyone may claim the name.
    con = sqlite3.connect(d.data_dir / "den.db")
    try:
        con.execute(
            "UPDATE domain_holds SET until = datetime('now', '-1 minutes') WHERE domain = ?",
            (dom,),
        )
        con.commit()
    finally:
        con.close()
    taken = as_user(d, other, "domain.add", ref="web", domain=dom)
    assert taken["workspace"] == f"{other}/web"
    as_user(d, other, "domain.remove", domain=dom)


def test_deleted_workspace_name_stays_reserved(
    d: Daemon, dns: DnsServer, users: Users, owner: str
) -> None:
    other = users.make()
    create(d, other, "web")
    create(d, owner, "gone")
    dom, pending = name(), name()
    verified(d, dns, owner, "gone", dom)
    as_user(d, owner, "domain.add", ref="gone", domain=pending)
    d.call("workspace.delete", ref=f"{owner}/gone")
    assert gate(d, "domain_target", dom) is None

    assert "reserved" in err_as(d, other, "domain.add", ref="web", domain=dom)["message"]
    # Its pending claim went with it and holds nothing.
    as_user(d, other, "domain.add", ref="web", domain=pending)
    # The owner may add the name to another workspace of theirs.
    assert as_user(d, owner, "domain.add", ref="site", domain=dom)["workspace"] == f"{owner}/site"
    as_user(d, owner, "domain.remove", domain=dom)
    as_user(d, other, "domain.remove", domain=pending)
