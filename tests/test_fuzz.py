"""Input fuzzing with hypothesis against a real daemon of this module's own.

Whatever is posted to /rpc, the answer is 204 or a well-formed JSON-RPC
response (or a list of them), never an internal error, and the daemon stays
healthy. Hostile user names are refused and create nothing.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from den.cli.client import Client, RpcError
from den.rpc.registry import REGISTRY
from den.services import load_all
from tests.conftest import Daemon, running_daemon

load_all()
METHODS = sorted(REGISTRY.methods)
FIELDS = {name: list(m.params.model_fields) for name, m in REGISTRY.methods.items()}
NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,30}")
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[Daemon]:
    """A daemon of this module's own: fuzzed calls may create and delete anything."""
    with running_daemon() as d:
        yield d


@pytest.fixture(scope="module")
def client(fuzz_daemon: Daemon) -> Iterator[Client]:
    c = fuzz_daemon.client()
    try:
        yield c
    finally:
        c.close()


# -- strategies ------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(text, inner, max_size=5),
    max_leaves=20,
)


# Values that pass some validation, so that calls get past it now and then.
plausible = st.sampled_from(
    ["fz", "fz-1", "root", "admin", "member", "read", "write", "1h", "30d", "", "x" * 201]
) | st.integers(-2, 5)


@st.composite
def params_for(draw: st.DrawFn, method: str) -> Any:
    fields = FIELDS.get(method, [])
    if fields and draw(st.integers(0, 4)):
        chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=len(fields)))
        return {f: draw(plausible | json_values) for f in chosen}
    if draw(st.integers(0, 4)):
        return {} if draw(st.booleans()) else []
    return draw(json_values)


@st.composite
def requests(draw: st.DrawFn) -> Any:
    """Request-like objects: mostly valid in form, so that validation is reached."""
    req: dict[str, Any] = {}
    if draw(st.integers(0, 19)):
        req["jsonrpc"] = "2.0" if draw(st.integers(0, 9)) else draw(json_values)
    method = draw(st.sampled_from(METHODS)) if draw(st.integers(0, 4)) else draw(json_values)
    if draw(st.integers(0, 19)):
        req["method"] = method
    if draw(st.integers(0, 3)):
        req["params"] = draw(params_for(method if isinstance(method, str) else ""))
    if draw(st.integers(0, 4)):
        req["id"] = draw(st.integers(-1000, 1000) | text | st.none() | json_values)
    if draw(st.integers(0, 19)) == 0:
        req[draw(text)] = draw(json_values)
    return req


bodies = st.one_of(
    requests(),
    requests(),
    st.lists(st.one_of(requests(), requests(), requests(), json_values), max_size=6),
    json_values,
)


# -- checks ----------------------------------------------------------------------


def is_notification(item: Any) -> bool:
    """A request that must get no response: valid, and without an id."""
    return (
        isinstance(item, dict)
        and "id" not in item
        and item.get("jsonrpc") == "2.0"
        and isinstance(item.get("method"), str)
        and ("params" not in item or isinstance(item["params"], dict | list))
    )


def check_response(resp: Any) -> None:
    assert isinstance(resp, dict), resp
    assert resp.get("jsonrpc") == "2.0"
    assert "id" in resp
    rid = resp["id"]
    assert rid is None or (isinstance(rid, str | int | float) and not isinstance(rid, bool))
    assert ("result" in resp) != ("error" in resp), resp
    assert set(resp) <= {"jsonrpc", "id", "result", "error"}
    event("ok" if "result" in resp else f"error {resp['error'].get('code')}")
    if "error" in resp:
        err = resp["error"]
        assert isinstance(err, dict) and set(err) <= {"code", "message", "data"}
        assert isinstance(err["code"], int) and isinstance(err["message"], str)
        assert err["message"]
        assert err["code"] != -32603, f"internal error: {resp}"


def check_answer(status: int, out: bytes, payload: Any, parsed: bool) -> None:
    """``payload``: what the body parses to (when ``parsed``)."""
    if status == 204:
        assert out == b""
        assert parsed
        items = payload if isinstance(payload, list) else [payload]
        assert payload != [] and all(is_notification(i) for i in items)
        return
    assert status == 200, (status, out[:200])
    resp = orjson.loads(out)
    if not parsed:
        assert resp["error"]["code"] == -32700 and resp["id"] is None
    if isinstance(payload, list) and payload:
        assert isinstance(resp, list)
        expected = sum(1 for i in payload if not is_notification(i))
        assert len(resp) == expected
        for r in resp:
            check_response(r)
    else:
        check_response(resp)
        if parsed and isinstance(payload, dict):
            assert not is_notification(payload)
            rid = payload.get("id")
            if "id" in payload and (
                rid is None or (isinstance(rid, str | int | float) and not isinstance(rid, bool))
            ):
                assert resp["id"] == rid


@FUZZ
@given(body=bodies)
def test_any_json_gets_a_well_formed_answer(client: Client, body: Any) -> None:
    status, out = client.post(orjson.dumps(body))
    check_answer(status, out, body, parsed=True)


@FUZZ
@given(
    raw=st.binary(max_size=300)
    | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_any_bytes_get_a_well_formed_answer(client: Client, raw: bytes) -> None:
    try:
        payload, parsed = orjson.loads(raw), True
    except orjson.JSONDecodeError:
        payload, parsed = None, False
    status, out = client.post(raw)
    check_answer(status, out, payload, parsed)


# -- hostile names -----------------------------------------------------------------

HOSTILE = [
    "../x",
    "../../etc/passwd",
    "a;rm -rf /",
    "a$(id)",
    "a`id`",
    "a b",
    "a\nb",
    "abc\n",
    " abc",
    "a\x00b",
    "ñame",
    "名前",
    "a\u200bb",
    "\uff41\uff42\uff43",  # fullwidth abc
    "x" * 10_000,
    "",
    "Alice",
    "ALICE",
    "-a",
    "1a",
    "a_b",
    "a.b",
    "a/b",
    "a" * 32,
    "a" * 31,  # valid for the pattern, but the host account would pass 32 characters
    "root",  # valid: exercised separately below
]


def accounts(d: Daemon) -> set[str]:
    return {pw.pw_name for pw in pwd.getpwall() if pw.pw_name.startswith(d.prefix)}


def user_names(d: Daemon) -> set[str]:
    return {u["name"] for u in d.call("user.list")}


def host_account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except (KeyError, ValueError):
        return False
    return True


@pytest.mark.parametrize("bad", [h for h in HOSTILE if h != "root"], ids=repr)
def test_hostile_name_refused(fuzz_daemon: Daemon, client: Client, bad: str) -> None:
    before_users, before_accounts = user_names(fuzz_daemon), accounts(fuzz_daemon)
    for method, params in [
        ("user.create", {"name": bad}),
        ("user.create", {"name": bad, "role": "admin", "display_name": bad}),
        ("user.get", {"name": bad}),
        ("user.delete", {"name": bad}),
        ("key.list", {"user": bad}),
        ("token.create", {"user": bad}),
    ]:
        if NAME_RE.fullmatch(bad) and method != "user.create":
            continue  # a well-formed name (too long only for a host account): not found
        status, out = client.post(
            orjson.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        )
        resp = orjson.loads(out)
        assert status == 200
        assert resp["error"]["code"] == -32602, (method, resp)
        assert resp["error"]["data"]["errors"][0]["field"] in ("name", "user"), resp
        if len(bad) > 100:
            assert bad not in out.decode()
    assert user_names(fuzz_daemon) == before_users
    assert accounts(fuzz_daemon) == before_accounts
    assert not host_account_exists(fuzz_daemon.prefix + bad)
    assert not host_account_exists(bad) or bad == "root"


def test_refused_calls_are_audited(client: Client) -> None:
    """Refused calls are audited as such, and nothing else happened."""
    params = {"method": "user.create", "outcome": "invalid_params", "limit": 1000}
    events = client.call("audit.list", params)
    assert events, "refused user.create calls are audited"
    assert all(e["target"] == "" or e["target"].startswith("user:") for e in events)


@FUZZ
@given(bad=text)
def test_generated_bad_names_refused(fuzz_daemon: Daemon, client: Client, bad: str) -> None:
    assume(not NAME_RE.fullmatch(bad))
    req = {"jsonrpc": "2.0", "method": "user.create", "params": {"name": bad}, "id": 1}
    status, out = client.post(orjson.dumps(req))
    resp = orjson.loads(out)
    assert status == 200
    assert resp["error"]["code"] == -32602, resp
    assert not host_account_exists(fuzz_daemon.prefix + bad)


def test_no_user_created_by_name_fuzzing(fuzz_daemon: Daemon) -> None:
    for name in user_names(fuzz_daemon):
        assert NAME_RE.fullmatch(name), name
        assert host_account_exists(fuzz_daemon.prefix + name)
    for account in accounts(fuzz_daemon):
        assert account.removeprefix(fuzz_daemon.prefix) in user_names(fuzz_daemon)


def test_daemon_healthy_after_fuzzing(fuzz_daemon: Daemon, client: Client) -> None:
    # Last in the module: pytest runs tests in file order.
    assert fuzz_daemon.call("rpc.health")["status"] == "ok"
    assert fuzz_daemon.proc is not None and fuzz_daemon.proc.poll() is None
    assert "Traceback" not in fuzz_daemon.log_text()


# -- human text --------------------------------------------------------------------

TEXT_USER = "fz-text"
# NUL, an escape sequence (clear screen), CR, DEL, a C1 control (CSI), a Unicode line separator.
CONTROLS = ["a\x00b", "a\x1b[2Jb", "a\rb", "a\x7fb", "a\x9b2Jb", "a\u2028b"]


@pytest.fixture(scope="module")
def text_user(fuzz_daemon: Daemon) -> Iterator[str]:
    fuzz_daemon.call("user.create", name=TEXT_USER, display_name="Ada Old")
    try:
        yield TEXT_USER
    finally:
        fuzz_daemon.call("user.delete", name=TEXT_USER)


def state(d: Daemon, user: str) -> Any:
    return (
        d.call("user.get", name=user)["display_name"],
        user_names(d),
        d.call("token.list", user=user),
        d.call("key.list", user=user),
        d.call("egress.list"),
        d.call("ui.list"),
    )


@pytest.mark.parametrize("bad", CONTROLS, ids=repr)
def test_control_characters_in_human_text_refused(
    fuzz_daemon: Daemon, client: Client, text_user: str, bad: str
) -> None:
    """Text den stores and shows to others takes no control characters; a refused call
    names the field and changes nothing. The workspace "nows" does not exist: the text is
    refused before anything is looked up."""
    import asyncssh

    pub = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    before = state(fuzz_daemon, text_user)
    for method, params, field in [
        ("user.update", {"name": text_user, "display_name": bad}, "display_name"),
        ("user.create", {"name": "fz-ctl", "display_name": bad}, "display_name"),
        ("token.create", {"user": text_user, "description": bad}, "description"),
        ("key.add", {"user": text_user, "key": f"{pub} {bad}"}, "key"),
        ("share.link", {"ref": "nows", "note": bad}, "note"),
        ("egress.allow", {"dest": "192.0.2.1", "note": bad}, "note"),
        ("ui.allow", {"addr": "192.0.2.7", "note": bad}, "note"),
        ("code.push", {"workspace": "nows", "message": bad}, "message"),
    ]:
        req = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
        status, out = client.post(orjson.dumps(req))
        resp = orjson.loads(out)
        assert status == 200
        assert resp["error"]["code"] == -32602, (method, resp)
        assert [e["field"] for e in resp["error"]["data"]["errors"]] == [field], (method, resp)
    assert state(fuzz_daemon, text_user) == before


def test_human_text_keeps_unicode_and_commit_message_lines(
    fuzz_daemon: Daemon, text_user: str
) -> None:
    fuzz_daemon.call("user.update", name=text_user, display_name="Zoë 名前 😀")
    assert fuzz_daemon.call("user.get", name=text_user)["display_name"] == "Zoë 名前 😀"
    fuzz_daemon.call("user.update", name=text_user, display_name="Ada Old")
    # Lines and tabs pass validation: the call gets as far as finding the workspace.
    with pytest.raises(RpcError) as err:
        fuzz_daemon.call("code.push", workspace=f"{text_user}/nows", message="Subject\n\n\tbody\n")
    assert err.value.code != -32602, err.value
