"""The OpenRPC document and the reach of every registered method.

Every method of the registry is documented in ``rpc.discover`` (valid against
the OpenRPC meta-schema) and reachable from the CLI.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7
from typer.testing import CliRunner

from den.cli.main import build
from den.rpc.registry import REGISTRY, Method
from den.services import load_all
from tests.conftest import DEN, ROOT, Daemon

META_SCHEMA = ROOT / ".cache" / "openrpc-meta-schema.json"

load_all()
METHODS: list[Method] = sorted(REGISTRY.methods.values(), key=lambda m: m.name)


@pytest.fixture(scope="module")
def doc(daemon: Daemon) -> dict[str, Any]:
    result: dict[str, Any] = daemon.call("rpc.discover")
    return result


@pytest.fixture(scope="module")
def by_name(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in doc["methods"]}


def _meta_schema() -> dict[str, Any]:
    if not META_SCHEMA.exists():
        pytest.fail(f"{META_SCHEMA} is missing: run scripts/fetch-test-data")
    schema: dict[str, Any] = json.loads(META_SCHEMA.read_text())
    return schema


def _validator() -> Draft7Validator:
    """The OpenRPC meta-schema, offline.

    Its ``$schema`` is a custom URL, so the draft is chosen here; its schema
    objects refer to https://meta.json-schema.tools, the draft-07 meta-schema,
    which is served from jsonschema's own copy instead of the network.
    """
    draft7 = Resource.from_contents(Draft7Validator.META_SCHEMA, default_specification=DRAFT7)
    registry: Registry[Any] = Registry().with_resources(
        [("https://meta.json-schema.tools", draft7), ("https://meta.json-schema.tools/", draft7)]
    )
    return Draft7Validator(_meta_schema(), registry=registry)


def test_registry_is_not_empty() -> None:
    names = {m.name for m in METHODS}
    assert {"rpc.discover", "rpc.health", "user.create", "token.create"} <= names


def test_valid_against_meta_schema(doc: dict[str, Any]) -> None:
    validator = _validator()
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_meta_schema_rejects_a_broken_document(doc: dict[str, Any]) -> None:
    """The validation has teeth: a document with a malformed method fails."""
    validator = _validator()
    broken = {**doc, "methods": [{**doc["methods"][0], "params": "none"}]}
    assert not validator.is_valid(broken)
    assert not validator.is_valid({k: v for k, v in doc.items() if k != "info"})
    # Schemas inside are checked against draft-07 too.
    m = next(m for m in doc["methods"] if m["params"])
    bad_param = {**m["params"][0], "schema": {"type": "nonsense"}}
    assert not validator.is_valid({**doc, "methods": [{**m, "params": [bad_param]}]})


def test_version_and_info(daemon: Daemon, doc: dict[str, Any]) -> None:
    assert doc["openrpc"].startswith("1.3")
    assert doc["info"]["title"] == "den"
    assert doc["info"]["version"] == daemon.call("rpc.health")["version"]


def test_document_over_plain_http_get(daemon: Daemon, doc: dict[str, Any]) -> None:
    import urllib.request

    with urllib.request.urlopen(daemon.http_url.rstrip("/") + "/openrpc.json", timeout=30) as r:
        assert r.status == 200
        assert json.loads(r.read()) == doc


def test_every_method_is_documented(by_name: dict[str, dict[str, Any]]) -> None:
    assert set(by_name) == {m.name for m in METHODS}


@pytest.mark.parametrize("m", METHODS, ids=lambda m: m.name)
def test_method_entry(m: Method, by_name: dict[str, dict[str, Any]]) -> None:
    entry = by_name[m.name]
    assert entry["description"].strip()
    assert m.summary and entry["summary"] == m.summary
    assert entry["x-right"] == m.right.name
    assert f"Required right: {m.right.name}" in entry["description"]
    assert entry["x-mutating"] is m.mutating
    # Params in the order positional (array) params bind to them.
    assert [p["name"] for p in entry["params"]] == list(m.params.model_fields)
    for p in entry["params"]:
        assert p.get("description", "").strip(), f"{m.name}: param {p['name']} has no description"
        assert isinstance(p["schema"], dict) and p["schema"]
        info = m.params.model_fields[p["name"]]
        assert p["required"] is info.is_required()
    assert entry["result"]["name"] and isinstance(entry["result"]["schema"], dict)
    codes = {e["code"] for e in entry["errors"]}
    assert {-32001, -32002, -32003, -32006} <= codes


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_every_ref_resolves(doc: dict[str, Any]) -> None:
    schemas = doc.get("components", {}).get("schemas", {})
    refs = set(_refs(doc["methods"])) | set(_refs(schemas))
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_schemas_are_valid_json_schema(doc: dict[str, Any]) -> None:
    for entry in doc["methods"]:
        for p in entry["params"]:
            Draft7Validator.check_schema(p["schema"])
        Draft7Validator.check_schema(entry["result"]["schema"])
    for schema in doc.get("components", {}).get("schemas", {}).values():
        Draft7Validator.check_schema(schema)


def test_result_schema_describes_real_result(daemon: Daemon, doc: dict[str, Any]) -> None:
    """A real result validates against the documented result schema."""
    entry = next(m for m in doc["methods"] if m["name"] == "rpc.health")
    schema = {**entry["result"]["schema"], "components": doc.get("components", {})}
    Draft7Validator(schema).validate(daemon.call("rpc.health"))
    entry = next(m for m in doc["methods"] if m["name"] == "rpc.discover")
    assert entry["result"]["schema"]


# -- every method is reachable from the CLI -----------------------------------------


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


# Methods a transport serves as a stream (no JSON-RPC result to print): the
# command that streams through them.
CALLED_BY = {"workspace.exec_stream": "exec"}


@pytest.mark.parametrize("m", METHODS, ids=lambda m: m.name)
def test_method_has_cli_command(m: Method, runner: CliRunner) -> None:
    if m.name in CALLED_BY:  # a stream: another method's command uses it
        res = runner.invoke(build(), [CALLED_BY[m.name], "--help"], prog_name="den")
        assert res.exit_code == 0 and m.name in res.output, res.output
        return
    assert m.cli is not None, f"{m.name} has no CLI path"
    args = [*m.cli.path.split(), "--help"]
    res = runner.invoke(build(), args, prog_name="den", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert f"RPC method: {m.name}" in res.output
    assert m.summary.split()[0] in res.output


def test_cli_paths_are_unique() -> None:
    paths = [m.cli.path for m in METHODS if m.cli is not None]
    assert len(paths) == len(set(paths))


def test_cli_help_lists_methods(runner: CliRunner) -> None:
    res = runner.invoke(build(), ["--help"], prog_name="den", env={"COLUMNS": "200"})
    assert res.exit_code == 0
    tops = {m.cli.path.split()[0] for m in METHODS if m.cli is not None}
    for top in tops:
        assert top in res.output


def test_cli_help_in_subprocess(daemon: Daemon) -> None:
    res = subprocess.run(
        [DEN, "user", "add", "--help"],
        env={**daemon.env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "RPC method: user.create" in res.stdout
    assert "--key" in res.stdout and "--admin" in res.stdout


def test_discover_from_cli(daemon: Daemon, doc: dict[str, Any]) -> None:
    res = CliRunner().invoke(build(), ["discover", "--json"], env=daemon.env, prog_name="den")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == doc


def test_cli_builds_once(runner: CliRunner) -> None:
    """build() is idempotent: commands are not attached twice."""
    app = build()
    assert build() is app
    res = runner.invoke(app, ["user", "--help"], prog_name="den", env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert res.output.count(" add ") <= 1 and Path(DEN).exists()
