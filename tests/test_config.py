"""Configuration: defaults, den.toml, DEN_* variables, flags, instances, docs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import PydanticUndefined
from typer.testing import CliRunner

from den import config as den_config
from den.cli.main import build
from den.config import Settings
from tests.conftest import DEN, ROOT

OPTIONS = list(Settings.model_fields)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No DEN_* variables; DEN_CONFIG points at a den.toml that does not exist yet."""
    for var in list(os.environ):
        if var.startswith("DEN_"):
            monkeypatch.delenv(var)
    toml = tmp_path / "den.toml"
    monkeypatch.setenv("DEN_CONFIG", str(toml))
    return toml


def show(*args: str, env: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """`den config show --json` in-process; the environment is the test's."""
    res = CliRunner().invoke(build(), ["config", "show", "--json", *args], env=env, prog_name="den")
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    data = json.loads(res.stdout) if res.exit_code == 0 else None
    return res.exit_code, data, res.stderr


def rows(data: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["option"]: r for r in data}


def test_every_option_has_default_type_and_help() -> None:
    for name, info in Settings.model_fields.items():
        assert info.annotation is not None, name
        assert info.default is not PydanticUndefined or info.default_factory, name
        assert info.description and info.description.strip(), f"{name} has no help line"


def test_show_lists_every_option(clean_env: Path) -> None:
    code, data, err = show()
    assert code == 0, err
    assert [r["option"] for r in data] == OPTIONS
    defaults = Settings().model_dump(mode="json")
    for r in data:
        assert set(r) == {"option", "value", "source", "help"}
        assert r["source"] == "default", r
        assert r["value"] == defaults[r["option"]]
        assert r["help"] == Settings.model_fields[r["option"]].description


def test_defaults(clean_env: Path) -> None:
    by = rows(show()[1])
    assert by["socket"]["value"] == "/run/den/den.sock"
    assert by["data_dir"]["value"] == "/var/lib/den"
    assert by["http_port"]["value"] == 8780
    assert by["ssh_port"]["value"] == 2222
    assert by["max_body_bytes"]["value"] == 1 << 20


def test_show_as_table(clean_env: Path) -> None:
    res = CliRunner().invoke(build(), ["config", "show"], prog_name="den")
    assert res.exit_code == 0
    for name in OPTIONS:
        assert name in res.stdout


def test_precedence_file_env_flag(clean_env: Path) -> None:
    clean_env.write_text('http_port = 1111\nssh_port = 1112\nlog_level = "debug"\ninstance = 2\n')
    env = {"DEN_SSH_PORT": "2221", "DEN_INSTANCE": "4"}
    code, data, err = show("--instance", "7", env=env)
    assert code == 0, err
    by = rows(data)
    file_src = f"file {clean_env}"
    assert (by["log_level"]["value"], by["log_level"]["source"]) == ("debug", file_src)
    assert (by["http_port"]["value"], by["http_port"]["source"]) == (1111, file_src)
    assert (by["ssh_port"]["value"], by["ssh_port"]["source"]) == (2221, "env DEN_SSH_PORT")
    assert (by["instance"]["value"], by["instance"]["source"]) == (7, "flag")
    assert by["http_host"]["source"] == "default"
    # Values given explicitly are not shifted by the instance; derived ones are.
    assert by["data_dir"]["value"] == "/var/lib/den-7"
    assert by["data_dir"]["source"] == "instance 7"


def test_precedence_in_load(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env.write_text('http_host = "10.0.0.1"\nhttp_port = 1111\n')
    settings, sources = den_config.load()
    assert (settings.http_port, sources["http_port"]) == (1111, f"file {clean_env}")
    monkeypatch.setenv("DEN_HTTP_PORT", "2222")
    settings, sources = den_config.load()
    assert (settings.http_port, sources["http_port"]) == (2222, "env DEN_HTTP_PORT")
    settings, sources = den_config.load({"http_port": 3333, "ssh_port": None})
    assert (settings.http_port, sources["http_port"]) == (3333, "flag")
    assert (settings.ssh_port, sources["ssh_port"]) == (2222, "default")  # None is no flag
    assert (settings.http_host, sources["http_host"]) == ("10.0.0.1", f"file {clean_env}")


def test_config_flag_beats_den_config(clean_env: Path, tmp_path: Path) -> None:
    clean_env.write_text("http_port = 1111\n")
    other = tmp_path / "other.toml"
    other.write_text("http_port = 4444\n")
    by = rows(show("--config", str(other))[1])
    assert (by["http_port"]["value"], by["http_port"]["source"]) == (4444, f"file {other}")


def test_missing_config_file_means_defaults(clean_env: Path) -> None:
    assert not clean_env.exists()
    code, data, _ = show()
    assert code == 0 and all(r["source"] == "default" for r in data)


def test_instance_derives_paths_and_ports(clean_env: Path) -> None:
    code, data, err = show("--instance", "3")
    assert code == 0, err
    by = rows(data)
    assert by["instance"]["value"] == 3
    assert by["socket"]["value"] == "/run/den/den-3.sock"
    assert by["data_dir"]["value"] == "/var/lib/den-3"
    assert by["http_port"]["value"] == 8783
    assert by["ssh_port"]["value"] == 2225
    assert by["socket_group"]["value"] == "den3"
    assert by["account_prefix"]["value"] == "den3-"
    for name in ("socket", "data_dir", "http_port", "ssh_port"):
        assert by[name]["source"] == "instance 3"


def test_instance_keeps_explicit_values(clean_env: Path) -> None:
    clean_env.write_text('instance = 3\nhttp_port = 9000\nsocket = "/tmp/x.sock"\n')
    code, data, err = show(env={"DEN_SSH_PORT": "0"})
    assert code == 0, err
    by = rows(data)
    assert by["instance"]["source"] == f"file {clean_env}"
    assert by["http_port"]["value"] == 9000
    assert by["socket"]["value"] == "/tmp/x.sock"
    assert by["ssh_port"]["value"] == 0  # 0 (any free port) stays 0
    assert by["data_dir"]["value"] == "/var/lib/den-3"


def test_instance_through_subprocess(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEN_")}
    env["DEN_CONFIG"] = str(tmp_path / "none.toml")
    res = subprocess.run(
        [DEN, "config", "show", "--instance", "3", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    by = rows(json.loads(res.stdout))
    assert by["socket"]["value"] == "/run/den/den-3.sock"
    assert by["data_dir"]["value"] == "/var/lib/den-3"
    assert (by["http_port"]["value"], by["ssh_port"]["value"]) == (8783, 2225)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ('http_port = "abc"', ["http_port", "valid integer"]),
        ("http_port = 70000", ["http_port", "65535"]),
        ('log_level = "loud"', ["log_level", "debug"]),
        ("htt_port = 1", ["htt_port", "unknown option"]),
        ('account_prefix = "Bad_"', ["account_prefix"]),
        ("http_port = ", ["line 1"]),
        ("[section\n", ["line 1"]),
    ],
    ids=["not-int", "out-of-range", "bad-choice", "unknown", "pattern", "syntax", "syntax2"],
)
def test_bad_toml_value(clean_env: Path, text: str, expect: list[str]) -> None:
    clean_env.write_text(text + "\n")
    code, _data, err = show()
    assert code != 0
    assert "bad configuration" in err
    assert str(clean_env) in err  # says which file
    for word in expect:
        assert word in err
    assert "Traceback" not in err and "_Loaded" not in err


def test_bad_env_value(clean_env: Path) -> None:
    code, _data, err = show(env={"DEN_HTTP_PORT": "eighty"})
    assert code != 0
    assert "http_port" in err and "DEN_HTTP_PORT" in err


def test_bad_config_stops_serve(tmp_path: Path) -> None:
    """`den serve` refuses to start on a bad file, with the same clear error."""
    bad = tmp_path / "den.toml"
    bad.write_text("http_port = [\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEN_")}
    res = subprocess.run(
        [DEN, "serve", "--config", str(bad)], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode != 0
    assert "bad configuration" in res.stderr and str(bad) in res.stderr


@pytest.mark.parametrize(("raw", "mode"), [("0660", 0o660), ("0o640", 0o640), ("600", 0o600)])
def test_socket_mode_is_octal(clean_env: Path, raw: str, mode: int) -> None:
    code, data, err = show(env={"DEN_SOCKET_MODE": raw})
    assert code == 0, err
    assert rows(data)["socket_mode"]["value"] == mode


def test_socket_mode_in_toml(clean_env: Path) -> None:
    clean_env.write_text("socket_mode = 0o600\n")
    assert rows(show()[1])["socket_mode"]["value"] == 0o600
    clean_env.write_text('socket_mode = "0640"\n')
    assert rows(show()[1])["socket_mode"]["value"] == 0o640
    clean_env.write_text('socket_mode = "rw-rw----"\n')
    code, _data, err = show()
    assert code != 0 and "socket_mode" in err and "octal" in err


def test_every_option_documented_in_readme() -> None:
    readme = ROOT / "README.md"
    assert readme.exists(), "README.md is missing"
    text = readme.read_text()
    documented = set(re.findall(r"`([a-z_]+)`", text))
    missing = [name for name in OPTIONS if name not in documented]
    assert not missing, f"options not documented in README.md: {missing}"


def test_ports_in_the_ephemeral_range_are_named(tmp_path: Path) -> None:
    """A listener port the kernel may give to an outgoing connection is reported
    (at start in the log, and by `den init --check`) with the way out."""
    from den.host.checks import ephemeral_clashes

    rng = tmp_path / "ip_local_port_range"
    rng.write_text("32768\t60999\n")
    s = Settings(http_port=8780, ssh_port=40022, web=True, https_port=52471)
    clashes = ephemeral_clashes(s, rng)
    assert len(clashes) == 2, clashes
    assert clashes[0].startswith("ssh_port 40022 is in the ephemeral range 32768-60999")
    assert "https_port 52471" in clashes[1] and "pick a port below 32768" in clashes[1]
    assert ephemeral_clashes(Settings(http_port=8780, ssh_port=2222), rng) == []
    rng.write_text("garbage")
    assert ephemeral_clashes(s, rng) == []
