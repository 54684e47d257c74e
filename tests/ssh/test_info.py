"""den info (host key fingerprints, ports) and den ssh-config (usable as is)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import DEN, Daemon
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


def test_ssh_config_forwards_the_agent_and_keeps_the_link_alive(alice: Person, ws: str) -> None:
    res = alice.ssh("den", "ssh-config", "--host", "127.0.0.1")
    assert res.returncode == 0, res.stderr
    host = res.stdout.split(f"Host den-{ws}\n", 1)[1].split("\n\n", 1)[0]
    opts = dict(line.split(None, 1) for line in host.strip().splitlines())
    assert opts["User"] == ws and opts["Port"] == str(alice.port)
    assert opts["HostName"] == "127.0.0.1"
    assert opts["ForwardAgent"] == "yes" and int(opts["ServerAliveInterval"]) > 0
    # The key hint names the user's key, whose file ssh may not offer by itself.
    fp = subprocess.run(
        ["ssh-keygen", "-lf", f"{alice.key}.pub"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert f"# den key: {fp}" in res.stdout
    # Hostile input never reaches the file as a new line of config.
    bad = alice.ssh("den", "ssh-config", "--host", "x\nProxyCommand=touch /tmp/p")
    assert bad.returncode != 0 and "ProxyCommand" not in bad.stdout


def test_ssh_config_install_writes_a_block_once(
    alice: Person, ws: str, pool_daemon: Daemon
) -> None:
    # A home the user's host account can reach (pytest's tmp_path is root's alone).
    home = pool_daemon.base / f"home-{alice.name}"
    try:
        _install_in(alice, ws, pool_daemon, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _install_in(alice: Person, ws: str, pool_daemon: Daemon, home: Path) -> None:
    (home / ".ssh").mkdir(parents=True)
    shutil.copy(alice.key, home / ".ssh" / "id_work")
    shutil.copy(f"{alice.key}.pub", home / ".ssh" / "id_work.pub")
    (home / ".ssh" / "config").write_text("Host mine\n    HostName example.invalid\n")
    kw = pool_daemon._as(alice.name)
    os.chown(home, kw["user"], kw["group"])
    for p in home.rglob("*"):
        os.chown(p, kw["user"], kw["group"])
    kw["env"] = {**kw["env"], "HOME": str(home)}

    def install() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [DEN, "ssh-config", "--install", "--host", "127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
            **kw,
        )

    first = install()
    assert first.returncode == 0 and "installed" in first.stdout, first.stderr
    cfg = home / ".ssh" / "config"
    text = cfg.read_text()
    assert text.startswith("Host mine\n    HostName example.invalid\n")
    # ~ is the account's home in the password database (not $HOME): a path then.
    assert f"IdentityFile {home / '.ssh' / 'id_work'}" in text and f"Host den-{ws}" in text
    assert cfg.stat().st_mode & 0o022 == 0  # never writable by others (ssh refuses it)
    again = install()
    assert again.returncode == 0 and "unchanged" in again.stdout, again.stderr
    assert cfg.read_text() == text and text.count(">>> den ") == 1
    # As written, it works: no -i, the key comes from the block's IdentityFile.
    out = subprocess.run(
        [
            "ssh",
            "-F",
            str(cfg),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            f"den-{ws}",
            "cat /etc/hostname",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )
    assert out.returncode == 0 and out.stdout.strip() == ws, out.stderr
    # The den shell runs on the server: it cannot write the caller's files.
    shell = alice.ssh("den", "ssh-config", "--install")
    assert shell.returncode != 0 and "your own machine" in shell.stderr + shell.stdout
