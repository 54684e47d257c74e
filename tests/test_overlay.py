"""The overlay network address: den finds a 400::/7 (Mycelium) address on the
host's interfaces and serves its HTTP listener there too. Each test makes a
network namespace with a dummy interface carrying such an address and runs den
inside it (`ip netns exec`)."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.conftest
from tests.conftest import Daemon, dispose, make_base

OVERLAY = "4ab:1234::1"
DETECT = (
    "import json, sys; from den.net import overlay\n"
    "out = {'found': overlay.addresses()}\n"
    "for setting in sys.argv[1:]:\n"
    "    try:\n"
    "        out[setting] = overlay.choose(setting)\n"
    "    except ValueError as exc:\n"
    "        out[setting] = 'error: ' + str(exc)\n"
    "print(json.dumps(out))\n"
)


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[str]:
    """An empty network namespace (loopback up); deleted after."""
    ns = f"den-ovl-{secrets.token_hex(3)}"
    ip("netns", "add", ns)
    try:
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)


@pytest.fixture
def overlay_ns(netns: str) -> str:
    """The namespace with an interface on the overlay (and a plain global address)."""
    try:
        ip("-n", netns, "link", "add", "ovl0", "type", "dummy")
    except subprocess.CalledProcessError:
        # Kernels built without the dummy driver (this test VM's): one end of a
        # veth pair whose both ends stay in the namespace is the same to den.
        ip("-n", netns, "link", "add", "ovl0", "type", "veth", "peer", "name", "ovl1")
        ip("-n", netns, "link", "set", "ovl1", "up")
    ip("-n", netns, "link", "set", "ovl0", "up")
    ip("-n", netns, "addr", "add", "2001:db8::5/64", "dev", "ovl0", "nodad")
    ip("-n", netns, "addr", "add", f"{OVERLAY}/64", "dev", "ovl0", "nodad")
    return netns


def detect(ns: str, *settings: str) -> dict[str, object]:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", DETECT, *settings],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out: dict[str, object] = json.loads(res.stdout)
    return out


def test_detection_finds_the_overlay_address_and_only_it(overlay_ns: str) -> None:
    got = detect(overlay_ns, "auto", "off", OVERLAY, "2001:db8::5", "4ab:1234::2")
    assert got["found"] == [OVERLAY]  # not 2001:db8::5, ::1 or the link-local one
    assert got["auto"] == OVERLAY
    assert got["off"] is None
    assert got[OVERLAY] == OVERLAY
    assert got["2001:db8::5"] == "2001:db8::5"  # named explicitly: any address of the host
    assert "is not an address of this host" in str(got["4ab:1234::2"])


def test_no_overlay_address_means_none(netns: str) -> None:
    got = detect(netns, "auto", OVERLAY)
    assert got["found"] == [] and got["auto"] is None
    assert "is not an address of this host" in str(got[OVERLAY])


@pytest.fixture
def ns_daemon(overlay_ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    """A den daemon inside the namespace (its unix socket is a file: reachable from here)."""
    d = Daemon(make_base())
    d.env["DEN_HTTP_OVERLAY"] = "auto"
    # `ip netns exec` joins the namespace and execs den (same pid: stop() signals den).
    wrapper = tmp_path / "den-in-ns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {overlay_ns} {tests.conftest.DEN} "$@"\n')
    wrapper.chmod(0o755)
    try:
        with monkeypatch.context() as m:
            m.setattr(tests.conftest, "DEN", str(wrapper))
            d.start()
        yield d
    finally:
        dispose(d)


def curl_in(ns: str, *argv: str) -> tuple[int, str]:
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "curl", "-sS", "-g", "-m", "20", "-w", "\n%{http_code}", *argv],
        capture_output=True,
        text=True,
        timeout=40,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    body, _, code = res.stdout.rpartition("\n")
    return int(code), body


def test_a_daemon_serves_its_api_on_the_overlay_address(ns_daemon: Daemon, overlay_ns: str) -> None:
    d = ns_daemon
    state = json.loads((d.data_dir / "serve.json").read_text())
    assert state["overlay"] == OVERLAY
    port = state["http_port"]
    info = d.call("system.info")
    assert info["overlay"] == OVERLAY
    assert info["overlay_http"] == f"http://[{OVERLAY}]:{port}"
    assert OVERLAY in d.cli("info", check=True).stdout

    url = f"http://[{OVERLAY}]:{port}/rpc"
    body = '{"jsonrpc": "2.0", "id": 1, "method": "auth.whoami"}'
    status, text = curl_in(overlay_ns, "-d", body, "-H", "Content-Type: application/json", url)
    assert status == 200, text
    assert json.loads(text)["result"]["via"] == "tcp"

    # The UI allow-list covers this listener as well.
    d.call("ui.allow", addr="127.0.0.1")
    status, text = curl_in(overlay_ns, "-d", body, url)
    assert status == 403 and f"{OVERLAY} is not on den's UI allow-list" in text
    d.call("ui.allow", addr="400::/7")
    assert curl_in(overlay_ns, "-d", body, url)[0] == 200


def test_an_explicit_address_not_on_the_host_stops_den() -> None:
    d = Daemon(make_base())
    d.env["DEN_HTTP_OVERLAY"] = "4ab:9999::1"
    try:
        with pytest.raises(RuntimeError) as info:
            d.start()
        assert "http_overlay = 4ab:9999::1 is not an address of this host" in str(info.value)
    finally:
        dispose(d)
