"""`den ssh-config --install` on the client: only what den writes goes in, the
user's own lines and the file's owner and mode stay (den.cli.install)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from den.cli import install

GOOD = (
    "# den 7: `ssh den-NAME`, or pick it in VS Code's Remote-SSH list\n"
    "# den key: SHA256:abc (ssh-ed25519)\n\n"
    "Host den-web\n    User web\n    HostName box.example\n    Port 2222\n"
    "    ServerAliveInterval 30\n    ServerAliveCountMax 4\n    ForwardAgent yes\n"
)


@pytest.mark.parametrize(
    "evil",
    [
        "    ProxyCommand touch /tmp/owned",
        'Match exec "touch /tmp/owned"',
        "    LocalCommand id",
        "Host *\n    ForwardAgent yes",
        "    HostName x ProxyCommand=id",
        "    User web\r",
    ],
)
def test_a_server_cannot_install_what_den_does_not_write(tmp_path: Path, evil: str) -> None:
    cfg = tmp_path / "config"
    cfg.write_text("Host mine\n    HostName mine.example\n")
    with pytest.raises(ValueError, match=r"not one den writes|control character"):
        install.install(cfg, GOOD + evil + "\n")
    assert cfg.read_text() == "Host mine\n    HostName mine.example\n"


def test_install_replaces_its_block_and_keeps_the_rest(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    cfg.write_text("Host mine\n    HostName mine.example\n")
    cfg.chmod(0o644)
    assert install.install(cfg, GOOD).startswith("installed")
    assert install.install(cfg, GOOD).startswith("unchanged")
    after = GOOD.replace("Port 2222", "Port 2223")
    cfg.write_text(cfg.read_text() + "Host later\n    HostName later.example\n")
    assert install.install(cfg, after).startswith("updated")
    text = cfg.read_text()
    assert text.startswith("Host mine\n") and text.endswith(
        "Host later\n    HostName later.example\n"
    )
    assert "Port 2223" in text and "Port 2222" not in text and text.count("# >>> den 7:") == 1
    assert cfg.stat().st_mode & 0o777 == 0o644  # its mode kept


def test_broken_markers_are_refused_and_nothing_is_lost(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    install.install(cfg, GOOD)
    # A hand edit lost the end marker, and the user's own entry follows it.
    text = cfg.read_text().replace("# <<< den 7 <<<\n", "") + "Host mine\n    HostName m\n"
    cfg.write_text(text)
    with pytest.raises(ValueError, match="markers"):
        install.install(cfg, GOOD)
    assert cfg.read_text() == text


def test_install_as_root_keeps_the_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to own a file as someone else")
    cfg = tmp_path / "config"
    cfg.write_text("Host mine\n")
    os.chown(cfg, 4321, 4321)
    install.install(cfg, GOOD)
    st = cfg.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4321)
