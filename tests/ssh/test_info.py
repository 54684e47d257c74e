"""den info (host key fingerprints, ports) and den ssh-config (usable as is)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import Daemon
from tests.ssh.conftest import Person, ssh_port


def test_info_prints_host_keys_and_port(pool_daemon: Daemon) -> None:
    res = pool_daemon.cli("info", "--json", check=True)
    info = json.loads(res.stdout)
    assert info["ssh_port"] == ssh_port(pool_daemon)
    algs = {k["algorithm"] for k in info["ssh_host_keys"]}
    assert algs == {"ssh-ed25519", "ssh-rsa"}
    scan = subprocess.run(
        ["ssh-keyscan", "-p", str(info["ssh_port"]), "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    keyfile = pool_daemon.base / "scanned"
    keyfile.write_text(scan.stdout)
    fps = subprocess.run(["ssh-keygen", "-lf", str(keyfile)], capture_output=True, text=True).stdout
    for k in info["ssh_host_keys"]:
        assert k["fingerprint"] in fps
    # Kept across restarts: the files exist with private modes.
    for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        assert (pool_daemon.data_dir / "ssh" / name).stat().st_mode & 0o077 == 0


def test_ssh_config_works_as_is(alice: Person, ws: str, tmp_path: Path) -> None:
    res = alice.ssh("den", "ssh-config", "--host", "127.0.0.1")
    assert res.returncode == 0, res.stderr
    cfg = tmp_path / "config"
    cfg.write_text(res.stdout)
    assert f"Host den-{ws}" in res.stdout and f"Port {alice.port}" in res.stdout
    opts = [o for o in alice.opts() if o not in ("-p", str(alice.port))]
    out = subprocess.run(
        ["ssh", "-F", str(cfg), *opts, f"den-{ws}", "cat /etc/hostname"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.strip() == ws, out.stderr
