"""OAuth2 bearer JWTs: verified against the issuer's JWKS, mapped to a den user by a claim.

On when ``oauth_enabled``: a JWT signed by a key of ``oauth_jwks_url`` (public
key algorithms only: never "none" nor HMAC, whose "key" would be public), with
``oauth_issuer`` as ``iss``, ``oauth_audience`` in ``aud`` and an ``exp`` in the
future, stands for the den user its ``oauth_user_claim`` names. PyJWT does the
verification; the JWKS is fetched with aiohttp, cached, and fetched again when
old or when a token names a key it lacks (at most once per
``oauth_jwks_refetch_seconds``, so
tokens with made-up key ids cannot make den hammer the issuer).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt
import orjson
from sqlalchemy import select

from den.db.models import User
from den.errors import Unauthenticated
from den.rpc.registry import Caller, Right

if TYPE_CHECKING:
    from den.app import App

log = logging.getLogger(__name__)

ALGORITHMS = frozenset(
    {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "ES256K",
        "EdDSA",
    }
)
MAX_TOKEN = 16384  # characters of a JWT: far above any real one, far below a header limit
MAX_JWKS = 1 << 20  # bytes of a JWKS document
FETCH_TIMEOUT = 10.0
MAX_AGE = 300.0  # seconds a fetched JWKS is trusted: keys the issuer removed stop working
LEEWAY = 30  # seconds of clock skew allowed on exp/nbf/iat
_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def looks_like_jwt(value: str) -> bool:
    """Three base64url parts separated by dots (den tokens have no dots)."""
    return len(value) <= MAX_TOKEN and _SHAPE.fullmatch(value) is not None


class JwtVerifier:
    """Verifies bearer JWTs for one App; holds the cached JWKS."""

    def __init__(self) -> None:
        self._url = ""
        self._jwks: list[dict[str, Any]] = []
        self._keys: dict[tuple[str | None, str], jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # monotonic time of the last good fetch
        self._tried_at = float("-inf")  # monotonic time of the last fetch, good or not
        self._error = ""
        self._lock = asyncio.Lock()

    async def caller(self, app: App, token: str) -> Caller | None:
        """The den user a JWT stands for; None when OAuth is off.

        Raises Unauthenticated, saying why, for a JWT den does not accept.
        """
        s = app.settings
        if not s.oauth_enabled:
            return None
        if not (s.oauth_jwks_url and s.oauth_issuer and s.oauth_audience):
            raise Unauthenticated(
                "JWTs cannot be checked: oauth_jwks_url, oauth_issuer and oauth_audience "
                "must all be set"
            )
        if not looks_like_jwt(token):
            raise Unauthenticated("malformed JWT: three base64url parts separated by dots")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed JWT: its parts are not base64url JSON") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise Unauthenticated(
                f"JWT algorithm {str(alg)[:20]!r} is not accepted: "
                f"one of {', '.join(sorted(ALGORITHMS))}"
            )
        if kid is not None and (not isinstance(kid, str) or len(kid) > 200):
            raise Unauthenticated("malformed JWT: its kid is not a string")
        key = await self._key(s.oauth_jwks_url, kid, alg, s.oauth_jwks_refetch_seconds)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=s.oauth_audience,
                issuer=s.oauth_issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the JWT has expired") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"the JWT is not for audience {s.oauth_audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated(f"the JWT is not issued by {s.oauth_issuer!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"the JWT has no {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated("the JWT's signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"the JWT is refused: {str(exc)[:200]}") from None
        return await self._user(app, claims)

    async def _user(self, app: App, claims: dict[str, Any]) -> Caller:
        claim = app.settings.oauth_user_claim
        value = claims.get(claim)
        if not isinstance(value, str) or not value:
            raise Unauthenticated(f"the JWT has no claim {claim!r} naming a den user")
        async with app.sessions() as db:
            user = (
                await db.execute(select(User).where(User.name == value[:64]))
            ).scalar_one_or_none()
        if user is None or user.name != value:
            raise Unauthenticated(f"the JWT's {claim!r} ({value[:64]!r}) is no den user")
        right = Right.admin if user.role == "admin" else Right.write
        return Caller(user.name, user.role, right, "jwt", user_id=user.id)

    async def _key(self, url: str, kid: str | None, alg: str, every: float) -> jwt.PyJWK:
        if url != self._url:
            self._url, self._jwks, self._keys, self._fetched_at = url, [], {}, None
            self._tried_at = float("-inf")
        now = time.monotonic()
        if self._fetched_at is None or now - self._fetched_at > MAX_AGE:
            await self._refresh(url, every)
        key = self._find(kid, alg)
        if key is None:
            await self._refresh(url, every)  # a key the issuer added since (rotation)
            key = self._find(kid, alg)
        if key is not None:
            return key
        if self._fetched_at is None:
            raise Unauthenticated(f"the issuer's JWKS could not be fetched: {self._error}")
        if kid is None:
            raise Unauthenticated(f"the JWT names no kid and the JWKS has no one {alg} key")
        raise Unauthenticated(f"no {alg} key {kid[:64]!r} in the issuer's JWKS")

    def _find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        cached = self._keys.get((kid, alg))
        if cached is not None:
            return cached
        found: list[jwt.PyJWK] = []
        for jwk in self._jwks:
            if kid is not None and jwk.get("kid") != kid:
                continue
            if jwk.get("kty") == "oct" or jwk.get("use", "sig") != "sig":
                continue  # never a shared secret; never an encryption key
            if jwk.get("alg", alg) != alg:
                continue
            try:
                found.append(jwt.PyJWK(jwk, algorithm=alg))
            except jwt.PyJWTError:
                continue  # a key of another type than the algorithm's
        if len(found) != 1:
            return None  # none, or (no kid) more than one that could be meant
        self._keys[(kid, alg)] = found[0]
        return found[0]

    async def _refresh(self, url: str, every: float) -> None:
        """Fetch the JWKS unless it was tried less than ``every`` seconds ago."""
        tried = self._tried_at
        async with self._lock:
            if self._tried_at != tried or time.monotonic() - self._tried_at < every:
                return  # fetched by another caller meanwhile, or too soon again
            self._tried_at = time.monotonic()
            try:
                keys = await fetch_jwks(url)
            except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self._error = str(exc)[:200] or type(exc).__name__
                log.warning("jwks fetch failed", extra={"ctx": {"url": url, "error": self._error}})
                return
            self._jwks, self._keys, self._fetched_at = keys, {}, time.monotonic()
            log.info("jwks fetched", extra={"ctx": {"url": url, "keys": len(keys)}})


async def fetch_jwks(url: str) -> list[dict[str, Any]]:
    """The keys of the JWKS at ``url``; ValueError when it is not one."""
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as resp:
        if resp.status != 200:
            raise ValueError(f"{url} answered HTTP {resp.status}")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(65536):
            body += chunk
            if len(body) > MAX_JWKS:
                raise ValueError(f"{url} sent more than {MAX_JWKS} bytes")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError(f"{url} did not send JSON") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        raise ValueError(f"{url} sent no JWKS (an object with a 'keys' list)")
    return [k for k in keys if isinstance(k, dict)]


_verifiers: weakref.WeakKeyDictionary[App, JwtVerifier] = weakref.WeakKeyDictionary()


def verifier(app: App) -> JwtVerifier:
    """The App's verifier (made on first use)."""
    v = _verifiers.get(app)
    if v is None:
        v = _verifiers[app] = JwtVerifier()
    return v


async def bearer_caller(app: App, header: str | None) -> Caller | None:
    """The caller of an ``Authorization: Bearer <JWT>`` header when OAuth is on;
    None for anything else (no header, a den token, OAuth off)."""
    if not header or not app.settings.oauth_enabled:
        return None
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or "." not in value:
        return None
    return await verifier(app).caller(app, value)
