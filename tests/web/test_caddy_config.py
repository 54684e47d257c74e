"""Caddy's configuration as den makes it: Caddy itself accepts it in both TLS modes,
and instance numbers shift the HTTPS port."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from den.config import Settings
from den.web import caddy_config


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"domain": "dev.example.com", "tls": "acme", "acme_email": "ops@example.com"},
        {"domain": "dev.example.com", "tls": "acme", "acme_ca": "https://acme.test/dir"},
    ],
)
def test_caddy_validates_the_config(tmp_path: Path, overrides: dict[str, str]) -> None:
    s = Settings(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]
    conf = caddy_config.build(
        s,
        tmp_path / "gate.sock",
        tmp_path / "admin.sock",
        tmp_path / "data",
        "http://127.0.0.1:1/a",
    )
    path = tmp_path / "caddy.json"
    path.write_text(json.dumps(conf))
    res = subprocess.run(
        ["caddy", "validate", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert res.returncode == 0, res.stderr
    server = conf["apps"]["http"]["servers"]["den"]
    if s.tls == "acme":
        policy = conf["apps"]["tls"]["automation"]["policies"][0]
        assert policy["on_demand"] and policy["issuers"][0]["module"] == "acme"
        assert server["listen"] == [":443"]
        assert "den_http" in conf["apps"]["http"]["servers"]
    else:
        assert server["listen"] == ["127.0.0.1:8443"]
        assert conf["apps"]["tls"]["certificates"]["automate"] == [
            "den.localhost",
            "*.den.localhost",
        ]


def test_instance_shifts_the_https_port() -> None:
    assert Settings(instance=3).web_port == 8446
    assert Settings(instance=3, domain="dev.example.com").web_port == 446
    assert Settings(instance=3, https_port=9000).web_port == 9000
