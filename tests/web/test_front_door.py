"""The front door on a daemon of its own: idle and wake through URLs, starting a
stopped workspace, Caddy dying, custom domains, `den ca` and `den info`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Daemon, unused_port
from tests.helpers.dns import DnsServer, dns_server
from tests.web.conftest import Web, caddy_pid, serve_files
from tests.web.test_jwt import Jwks, Key, oauth_env, rsa_key, serve
from tests.workspaces.conftest import BB, create, own_daemon
from tests.workspaces.test_idle import wait_for


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with dns_server() as server:
        yield server


@pytest.fixture(scope="module")
def key() -> Key:
    return rsa_key("web1")


@pytest.fixture(scope="module")
def issuer(key: Key) -> Iterator[Jwks]:
    jwks = Jwks([key.jwk()])
    server = serve(jwks)
    try:
        yield jwks
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def d(dns: DnsServer, issuer: Jwks) -> Iterator[Daemon]:
    env = {
        **oauth_env(issuer.url),
        "DEN_WEB": "true",
        "DEN_HTTPS_PORT": str(unused_port()),
        "DEN_WEB_START_STOPPED": "true",
        "DEN_DNS_SERVERS": json.dumps([dns.address]),
        "DEN_IDLE_CHECK_INTERVAL": "1",
        "DEN_IDLE_SUSPEND": "4",
        "DEN_DEFAULT_IMAGE": BB,
        "DEN_DEFAULT_MEMORY": "128M",
        "DEN_RECONCILE_INTERVAL": "0",
    }
    with own_daemon(env) as daemon:
        daemon.call("user.create", name="webber")
        yield daemon


@pytest.fixture(scope="module")
def web(d: Daemon) -> Web:
    return Web(d)


@pytest.fixture
def site(d: Daemon, request: pytest.FixtureRequest) -> Iterator[str]:
    """A public workspace of webber's serving a page; its name."""
    name = f"f{abs(hash(request.node.name)) % 10**6}"
    create(d, "webber", name, image=BB)
    ref = f"webber/{name}"
    d.call("workspace.idle", ref=ref, suspend="never")
    serve_files(d, ref)
    d.call("share.set", ref=ref, mode="public")
    try:
        yield name
    finally:
        d.call("workspace.delete", ref=ref)


def state(d: Daemon, ref: str) -> str:
    return str(d.call("workspace.get", ref=ref)["state"])


def test_requests_keep_a_workspace_awake_and_their_absence_lets_it_sleep(
    d: Daemon, web: Web, site: str
) -> None:
    ref = f"webber/{site}"
    d.call("workspace.idle", ref=ref, suspend="default")
    # Requests every second for three times the idle timeout: it stays up.
    end = time.monotonic() + 12
    while time.monotonic() < end:
        assert web.curl(web.url("webber", site)).status == 200
        assert state(d, ref) == "running"
        time.sleep(1)
    got = d.call("workspace.get", ref=ref)
    assert got["last_activity_kind"] == "http", got
    # Then nothing: it is suspended, and the next request wakes it.
    wait_for(lambda: state(d, ref) == "suspended", 30, "the idle suspend")
    r = web.curl(web.url("webber", site))
    assert r.status == 200 and r.text == "hello from den"
    assert state(d, ref) == "running"


def test_a_stopped_workspace_is_started_by_a_request_when_allowed(
    d: Daemon, web: Web, site: str
) -> None:
    ref = f"webber/{site}"
    d.call("workspace.stop", ref=ref)
    r = web.curl(web.url("webber", site), timeout=60)
    # Started, but nothing serves yet: den's page says so (its server did not come back).
    assert r.status == 502 and "does not answer on port 8080" in r.text
    assert state(d, ref) == "running"


def test_caddy_is_restarted_when_it_dies(d: Daemon, web: Web, site: str) -> None:
    old = caddy_pid(d)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: (d.data_dir / "caddy.pid").exists() and caddy_pid(d) != old, 30, "a new Caddy")

    def serves() -> bool:
        res = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                str(web.ca),
                web.url("webber", site),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return res.stdout == "200"

    wait_for(serves, 30, "the URL to work again")
    assert "caddy exited; restarting" in d.log_text()


def test_a_custom_domain_is_served_only_once_verified(
    d: Daemon, web: Web, dns: DnsServer, site: str
) -> None:
    domain = f"{site}.example.test"
    added = d.call("domain.add", ref=f"webber/{site}", domain=domain)
    token = next(r["value"] for r in added["records"] if r["type"] == "TXT")
    argv = [
        "curl",
        "-sS",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--cacert",
        str(web.ca),
        "--resolve",
        f"{domain}:{web.port}:127.0.0.1",
        f"https://{domain}:{web.port}/",
    ]
    before = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    # No certificate is issued and nothing is served for a name not yet verified.
    assert before.returncode != 0 or before.stdout.endswith("404"), before
    assert "hello from den" not in before.stdout
    dns.set(f"_den-challenge.{domain}", "TXT", token)
    d.call("domain.verify", domain=domain)
    after = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert after.returncode == 0, after.stderr
    assert after.stdout == "hello from den\n200"
    d.call("domain.remove", domain=domain)
    gone = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert "hello from den" not in gone.stdout


def test_den_ca_and_info(d: Daemon, web: Web) -> None:
    pem = d.call("web.ca")
    assert pem.startswith("-----BEGIN CERTIFICATE-----") and pem == web.ca.read_text()
    info = d.call("system.info")
    assert info["web"] == web.home and info["https_port"] == web.port
    assert info["tls"] == "internal" and info["ca_root"] == str(web.ca)
    out = d.cli("ca")
    assert out.returncode == 0 and out.stdout.strip() == pem.strip()


def test_a_jwt_opens_a_workspace_url_and_a_bad_one_does_not(
    d: Daemon, web: Web, key: Key, site: str
) -> None:
    ref = f"webber/{site}"
    d.call("share.set", ref=ref, mode="private")
    url = web.url("webber", site)
    assert web.curl(url).status == 302
    r = web.curl(url, headers={"Authorization": f"Bearer {key.sign('webber')}"})
    assert r.status == 200 and r.text == "hello from den"
    for bad in (
        key.sign("webber", iss="https://other.test/"),
        key.sign("webber", aud="someone-else"),
        key.sign("webber", exp=int(time.time()) - 120),
        key.sign("webber")[:-6] + "AAAAAA",
        rsa_key("web1").sign("webber"),  # the right kid, another key
    ):
        r = web.curl(url, headers={"Authorization": f"Bearer {bad}"})
        assert r.status == 401, r.text
