"""An identity provider's published signing keys (a JWKS), fetched without blocking the loop.

PyJWT's `PyJWKClient` fetches synchronously (urllib), which would stall every socket of the
process for as long as the provider takes to answer; this fetches with `httpx.AsyncClient`.

The rules, per key set:
- fetched on first use, kept for the response's `Cache-Control: max-age` (else
  `auth.jwks_cache_seconds`), each request with one retry and a deadline for the whole of
  it (`auth.jwks_timeout`: httpx's own timeout is per read, which an endpoint trickling its
  body a byte at a time would never trip);
- a token whose `kid` is not in the set refetches it, but at most once per
  `auth.jwks_min_refresh` seconds (also after a failure): a flood of made-up `kid`s costs
  at most one request, and all the tokens waiting meanwhile share it;
- while the endpoint errors the keys already held keep verifying (served stale);
- only the configured URL (or the one the issuer's own OIDC discovery document names) is
  ever fetched; a token's `jku`, `x5u` or `jwk` header is never looked at.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
import jwt
import msgspec

from protocol.jsondepth import too_deep
from server.app.config import ConfigError
from server.app.http_client import BadStatus, BodyTooLarge, fetch_capped
from server.edge.issuers import Issuer, check_url

log = logging.getLogger("parley.auth")

MAX_BODY: Final = 512 * 1024
MAX_AGE_CEILING: Final = 86_400.0
MAX_KEYS: Final = 100
MAX_DEPTH: Final = 16
"""A JWKS or discovery document nests 4 deep (`{"keys": [{"x5c": [...]}]}`)."""
ATTEMPTS: Final = 2
_MAX_AGE: Final = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.IGNORECASE)

ALGORITHMS_BY_KEY: Final[Mapping[tuple[str, str], frozenset[str]]] = {
    ("RSA", ""): frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    ("EC", "P-256"): frozenset({"ES256"}),
    ("EC", "P-384"): frozenset({"ES384"}),
    ("EC", "P-521"): frozenset({"ES512"}),
    ("OKP", "Ed25519"): frozenset({"EdDSA"}),
    ("OKP", "Ed448"): frozenset({"EdDSA"}),
}
"""Which algorithms a key of each type and curve may verify: pinned by the key, never taken
from the token alone (an HS256 token can never be checked against an RSA public key)."""


class FetchFailed(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Key:
    kid: str | None
    algorithms: frozenset[str]
    key: Any
    """The `cryptography` public key object."""


class KeySet:
    """One issuer's keys, by `kid`."""

    def __init__(
        self,
        issuer: Issuer,
        http: Callable[[], httpx.AsyncClient],
        *,
        cache_seconds: float,
        min_refresh: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.fetches = 0
        """Requests made for the key set (discovery and JWKS), for tests and logs."""
        self._http = http
        self._cache_seconds = cache_seconds
        self._min_refresh = min_refresh
        self._timeout = timeout
        self._clock = clock
        self._keys: dict[str | None, Key] = {}
        self._fresh_until = -1.0
        self._last_attempt: float | None = None
        self._jwks_url = issuer.jwks_url
        self._inflight: asyncio.Future[None] | None = None

    async def find(self, kid: str | None, alg: str) -> Key | None:
        """The key for a token's `kid` and `alg`, refreshing the set when it is stale or the
        `kid` unknown, as often as the rules above allow."""
        now = self._clock()
        if now >= self._fresh_until and self._may_fetch(now):
            await self._refresh()
        key = self._keys.get(kid)
        if key is None and self._may_fetch(self._clock()):
            await self._refresh()
            key = self._keys.get(kid)
        if key is None and kid is None:
            key = self._only_key_for(alg)
        if key is None or alg not in key.algorithms:
            return None
        return key

    def _may_fetch(self, now: float) -> bool:
        if self._inflight is not None:
            return True
        return self._last_attempt is None or now - self._last_attempt >= self._min_refresh

    def _only_key_for(self, alg: str) -> Key | None:
        """A token without `kid` is matched only when exactly one key can verify its alg."""
        fits = [k for k in self._keys.values() if alg in k.algorithms]
        return fits[0] if len(fits) == 1 else None

    async def _refresh(self) -> None:
        """One fetch at a time: callers arriving meanwhile wait for the same one."""
        if self._inflight is None:
            self._last_attempt = self._clock()
            self._inflight = asyncio.get_running_loop().create_future()
            try:
                await self._fetch()
            except FetchFailed as exc:
                held = f"; serving the {len(self._keys)} keys held" if self._keys else ""
                log.warning("JWKS of %s: %s%s", self.issuer.name, exc, held)
            finally:
                self._inflight.set_result(None)
                self._inflight = None
        else:
            await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        if not self._jwks_url:
            self._jwks_url = await self._discover()
        body, max_age = await self._get(self._jwks_url)
        keys = parse_jwks(body)
        if not keys:
            raise FetchFailed("the key set holds no usable signing key")
        self._keys = keys
        ttl = self._cache_seconds if max_age is None else max_age
        ttl = min(max(ttl, self._min_refresh), MAX_AGE_CEILING)
        self._fresh_until = self._clock() + ttl

    async def _discover(self) -> str:
        """The `jwks_uri` of the issuer's OIDC discovery document, which must name the same
        issuer (OpenID Connect Discovery 1.0, section 4.3)."""
        body, _ = await self._get(self.issuer.discovery_url)
        document = body if isinstance(body, dict) else {}
        uri = document.get("jwks_uri")
        if document.get("issuer") != self.issuer.issuer or not isinstance(uri, str):
            raise FetchFailed("the discovery document names another issuer or no jwks_uri")
        try:
            check_url(uri, "jwks_uri")
        except ConfigError as exc:
            raise FetchFailed(str(exc)) from None
        return uri

    async def _get(self, url: str) -> tuple[Any, float | None]:
        """GET a JSON document, retried once; redirects are not followed."""
        error = "no attempt"
        for _ in range(ATTEMPTS):
            self.fetches += 1
            try:
                return await self._get_once(url)
            except TimeoutError:
                error = f"{url}: no complete answer within {self._timeout:g} s"
            except BadStatus as exc:
                error = f"{url}: FetchFailed answered {exc.status}"
            except (httpx.HTTPError, msgspec.DecodeError, BodyTooLarge, FetchFailed) as exc:
                error = f"{url}: {type(exc).__name__} {exc}".strip()
        raise FetchFailed(error)

    async def _get_once(self, url: str) -> tuple[Any, float | None]:
        headers, body = await fetch_capped(
            self._http(),
            "GET",
            url,
            limit=MAX_BODY,
            deadline=self._timeout,
            accept=lambda status: status == 200,
        )
        if too_deep(body, MAX_DEPTH):  # the decoder would recurse past Python's limit
            raise FetchFailed(f"JSON nested more than {MAX_DEPTH} levels")
        return msgspec.json.decode(body), _max_age(headers)


def _max_age(headers: httpx.Headers) -> float | None:
    match = _MAX_AGE.search(headers.get("cache-control", ""))
    return float(match.group(1)) if match else None


def parse_jwks(body: object) -> dict[str | None, Key]:
    """The signing keys of a JWKS document; symmetric (`oct`), encryption-only and
    malformed keys are skipped."""
    entries = body.get("keys") if isinstance(body, dict) else None
    keys: dict[str | None, Key] = {}
    for entry in (entries if isinstance(entries, list) else [])[:MAX_KEYS]:
        key = _signing_key(entry)
        if key is not None:
            keys[key.kid] = key
    return keys


def _signing_key(entry: object) -> Key | None:
    if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
        return None
    kty, crv = entry.get("kty"), entry.get("crv", "")
    if not isinstance(kty, str) or not isinstance(crv, str):
        return None
    algorithms = ALGORITHMS_BY_KEY.get((kty, "" if kty == "RSA" else crv))
    if algorithms is None:
        return None
    pinned = entry.get("alg")
    if pinned is not None:
        if pinned not in algorithms:
            return None
        algorithms = frozenset({pinned})
    kid = entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        public = jwt.PyJWK(entry, algorithm=next(iter(sorted(algorithms)))).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    return Key(kid, algorithms, public)
