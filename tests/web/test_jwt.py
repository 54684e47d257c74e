"""OAuth2 bearer JWTs on the API: a JWKS served on loopback by the test, real keys,
real tokens, the real daemon over TCP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.conftest import Daemon, running_daemon
from tests.test_tokens import post

ISSUER = "https://issuer.test/"
AUDIENCE = "den-api"


@dataclass
class Jwks:
    """A JWKS document served over HTTP on loopback; counts the fetches."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    url: str = ""


def serve(jwks: Jwks) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            jwks.hits += 1
            body = json.dumps({"keys": jwks.keys}).encode()
            self.send_response(200 if self.path == "/jwks" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    jwks.url = f"http://127.0.0.1:{server.server_address[1]}/jwks"
    return server


def oauth_env(url: str) -> dict[str, str]:
    return {
        "DEN_OAUTH_ENABLED": "true",
        "DEN_OAUTH_JWKS_URL": url,
        "DEN_OAUTH_ISSUER": ISSUER,
        "DEN_OAUTH_AUDIENCE": AUDIENCE,
    }


@dataclass
class Key:
    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algo: dict[str, Any] = {
            "RS": RSAAlgorithm,
            "PS": RSAAlgorithm,
            "ES": ECAlgorithm,
            "Ed": OKPAlgorithm,
        }
        out: dict[str, Any] = algo[self.alg[:2]].to_jwk(public, as_dict=True)
        return {**out, "kid": self.kid, "use": "sig"}

    def sign(self, user: str | None, kid: str | None = "", **claims: Any) -> str:
        body = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300, "sub": user}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        headers = {"kid": self.kid if kid == "" else kid} if kid is not None else {}
        return jwt.encode(body, self.private, algorithm=self.alg, headers=headers)


def rsa_key(kid: str, alg: str = "RS256") -> Key:
    return Key(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {
        "rs": rsa_key("rs1"),
        "ps": rsa_key("ps1", "PS256"),
        "es": Key("es1", "ES256", ec.generate_private_key(ec.SECP256R1())),
        "ed": Key("ed1", "EdDSA", ed25519.Ed25519PrivateKey.generate()),
    }


@pytest.fixture(scope="module")
def issuer(keys: dict[str, Key]) -> Iterator[Jwks]:
    jwks = Jwks([k.jwk() for k in keys.values()])
    server = serve(jwks)
    try:
        yield jwks
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def oauth_daemon(issuer: Jwks) -> Iterator[Daemon]:
    with running_daemon(env=oauth_env(issuer.url)) as d:
        d.call("user.create", name="jmember")
        d.call("user.create", name="jadmin", role="admin")
        yield d


def whoami(d: Daemon, token: str) -> dict[str, Any]:
    status, body = post(d, f"Bearer {token}")
    assert status == 200, body
    return dict(body["result"])


def refused(d: Daemon, token: str, word: str) -> None:
    status, body = post(d, f"Bearer {token}")
    assert status == 401, body
    assert body["error"]["code"] == -32006
    assert word in body["error"]["message"], body


def test_jwt_accepted(oauth_daemon: Daemon, keys: dict[str, Key]) -> None:
    d = oauth_daemon
    for key in keys.values():
        me = whoami(d, key.sign("jmember"))
        assert (me["name"], me["role"], me["right"], me["via"]) == (
            "jmember",
            "member",
            "write",
            "jwt",
        )
    boss = whoami(d, keys["es"].sign("jadmin"))
    assert (boss["name"], boss["right"]) == ("jadmin", "admin")
    # The den CLI's client with a JWT as its token: calls as that user.
    c = d.client(token=keys["rs"].sign("jadmin", aud=[AUDIENCE, "other"]))
    try:
        assert "jmember" in {u["name"] for u in c.call("user.list", {})}
    finally:
        c.close()
    c = d.client(token=keys["ed"].sign("jmember"))
    try:
        link = c.call("login.link", {})  # a write method, as the user
        assert "/_den/login?t=" in link["url"]
        with pytest.raises(Exception) as info:
            c.call("user.create", {"name": "jnever"})
        assert "admin" in str(info.value)
    finally:
        c.close()


def test_jwt_refused(oauth_daemon: Daemon, keys: dict[str, Key]) -> None:
    d = oauth_daemon
    rs = keys["rs"]
    now = int(time.time())
    refused(d, rs.sign("jmember", iss="https://evil.test/"), "not issued by")
    refused(d, rs.sign("jmember", aud="someone-else"), "audience")
    refused(d, rs.sign("jmember", exp=now - 3600), "expired")
    refused(d, rs.sign("jmember", exp=None), "'exp'")
    refused(d, rs.sign("jmember", iss=None), "'iss'")
    refused(d, rs.sign("jmember", aud=None), "'aud'")
    refused(d, rs.sign("jmember", nbf=now + 3600), "refused")
    refused(d, rs.sign("nosuchuser"), "no den user")
    refused(d, rs.sign(None), "no claim 'sub'")
    refused(d, rs.sign("jmember", sub=12), "ubject")
    # Signed by another key under a kid of the JWKS.
    forged = Key("rs1", "RS256", rsa_key("x").private).sign("jmember")
    refused(d, forged, "signature")
    # A payload changed after signing.
    head, _payload, sig = rs.sign("jmember").split(".")
    other = rs.sign("jadmin").split(".")[1]
    refused(d, f"{head}.{other}.{sig}", "signature")
    # "none", and HMAC with the public key as the secret (algorithm confusion).
    unsigned = jwt.encode(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "sub": "jadmin"},
        None,  # type: ignore[arg-type]
        algorithm="none",
        headers={"kid": "rs1"},
    )
    refused(d, unsigned + "xxxx", "not accepted")
    refused(d, unsigned + "x", "malformed JWT")
    status, _body = post(d, f"Bearer {unsigned}")  # "a.b." is no JWT shape at all
    assert status == 401
    pem = (
        rs.private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    confused = _hs256(pem, {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "sub": "jadmin"})
    refused(d, confused, "not accepted")
    # A key used with another algorithm than its own.
    ps_as_es = Key("es1", "PS256", keys["ps"].private).sign("jmember")
    refused(d, ps_as_es, "no PS256 key 'es1'")
    refused(d, Key("ghost", "RS256", rs.private).sign("jmember"), "no RS256 key 'ghost'")
    refused(d, rs.sign("jmember", kid=None), "names no kid")
    refused(d, "a.b.c", "malformed JWT")
    refused(d, "x" * 100 + "." + "y" * 7800 + ".z", "malformed JWT")
    # None of these counts as a den token's failure: the address is not held.
    whoami(d, rs.sign("jmember"))


def _hs256(secret: str, claims: dict[str, Any]) -> str:
    """An HS256 token keyed by ``secret``, made by hand: PyJWT refuses PEM keys as HMAC secrets."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rs1"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_jwt_off_by_default(daemon: Daemon, keys: dict[str, Key]) -> None:
    status, body = post(daemon, f"Bearer {keys['rs'].sign('jmember')}")
    assert status == 401 and "malformed token" in body["error"]["message"]


def test_key_rotation_refetch_throttled() -> None:
    old, new = rsa_key("old"), Key("new", "ES256", ec.generate_private_key(ec.SECP256R1()))
    jwks = Jwks([old.jwk()])
    server = serve(jwks)
    try:
        env = {**oauth_env(jwks.url), "DEN_OAUTH_JWKS_REFETCH_SECONDS": "8"}
        with running_daemon(env=env) as d:
            d.call("user.create", name="rot")
            assert whoami(d, old.sign("rot"))["name"] == "rot"
            assert jwks.hits == 1
            whoami(d, old.sign("rot"))
            assert jwks.hits == 1  # cached
            jwks.keys.append(new.jwk())
            # Within oauth_jwks_refetch_seconds (8 s here) of the last fetch an unknown kid
            # is refused without a new one: made-up kids cannot make den hammer the issuer.
            refused(d, new.sign("rot"), "no ES256 key 'new'")
            refused(d, Key("ghost", "RS256", old.private).sign("rot"), "ghost")
            assert jwks.hits == 1
            time.sleep(8.5)
            assert whoami(d, new.sign("rot"))["name"] == "rot"
            assert jwks.hits == 2
            refused(d, Key("ghost", "RS256", old.private).sign("rot"), "ghost")
            assert jwks.hits == 2
            assert whoami(d, old.sign("rot"))["name"] == "rot"
    finally:
        server.shutdown()
        server.server_close()


def test_jwks_unreachable() -> None:
    key = rsa_key("k")
    jwks = Jwks([key.jwk()])
    server = serve(jwks)
    url = jwks.url
    server.shutdown()
    server.server_close()  # nothing listens there any more
    with running_daemon(env=oauth_env(url)) as d:
        d.call("user.create", name="nojwks")
        refused(d, key.sign("nojwks"), "could not be fetched")
        # A den token still works beside OAuth.
        token = d.call("token.create", user="nojwks")["token"]
        assert whoami(d, token)["name"] == "nojwks"
