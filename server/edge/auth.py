"""JWT verification and minting (pyjwt). The algorithms are pinned by configuration (the
local secret's) and by each identity provider's key types; `none` is never accepted."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import jwt
from redis.exceptions import RedisError

from protocol import text
from protocol.frames import MAX_SEQ, MAX_TOKEN_CHARS
from protocol.jsondepth import too_deep
from server.app.config import AuthSettings
from server.edge.issuers import ASYMMETRIC, ClaimsRefused, Issuer
from server.edge.jwks import KeySet

SECRET_FILE = "jwt_secret"
VERIFIED_CACHE_SIZE = 10_000
MAX_KID: Final = 256
HMAC: Final = frozenset({"HS256", "HS384", "HS512"})
MAX_PART_DEPTH: Final = 4
"""A JWT header or claims set nests no deeper than this (`aud` as a list is 2)."""


log = logging.getLogger("parley.auth")
MAX_ID_CHARS: Final = 256


class AuthError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    expires_at: float | None
    """The token's `exp` (Unix seconds), without leeway."""
    issued_at: float | None = None
    """The token's `iat`, if it has a usable one."""
    token_id: str = ""
    """What names this token for a revocation: `jti:<jti>`, else `sid:<sid>` (every token of
    that session), else `tok:<digest of the token>`."""
    group: str = ""
    """The user's budget group: the `budgets.group_claim` claim, if set and a short string."""
    claims: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)
    """The verified claims, kept only for the connect hook (`Verifier.keep_claims`)."""


class Revocations(Protocol):
    """Revoked tokens (`server.redis.revocations.Revocations`)."""

    async def revoked(self, principal: Principal) -> bool: ...


class Verifier:
    """Checks tokens signed with the local secret (HS256 by default, `auth.algorithms`) and,
    beside them, tokens of the configured identity providers (`server.edge.issuers`), whose
    keys come from their JWKS (`server.edge.jwks`). The token's header picks the path: an
    HMAC `alg` goes to the local secret, an asymmetric one to the issuer its `iss` names."""

    def __init__(
        self,
        settings: AuthSettings,
        secret: str,
        issuers: Sequence[Issuer] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        algorithms = [a for a in settings.algorithms if a in HMAC]
        if not algorithms and not issuers:
            raise AuthError("auth.algorithms names no usable algorithm")
        self.settings = settings
        self.secret = secret
        self.algorithms = algorithms
        self._cache: dict[str, Principal] = {}
        self.group_claim = ""
        """The claim naming the user's budget group (`budgets.group_claim`)."""
        self.keep_claims = False
        """Keep each token's verified claims in its `Principal` (the connect hook sends
        them); off, a principal holds no more than it needs."""
        self.revocations: Revocations | None = None
        """Checked once per token verified (a cached token skips it: `forget` a user whose
        tokens were revoked)."""
        self._http: httpx.AsyncClient | None = None
        self.key_sets = [
            KeySet(
                issuer,
                self._client,
                cache_seconds=settings.jwks_cache_seconds,
                min_refresh=settings.jwks_min_refresh,
                timeout=settings.jwks_timeout,
                clock=clock,
            )
            for issuer in issuers
        ]

    async def verify(self, token: str) -> Principal:
        """Check a token; one already checked is answered from a bounded cache until it
        expires (a reconnecting tab, or a load test's thousand sockets, reuse theirs)."""
        cached = self._cache.get(token)
        if cached is not None and (cached.expires_at or math.inf) + self.settings.leeway > (
            time.time()
        ):
            return cached
        _check_shape(token)
        header = _header(token)
        alg = header.get("alg")
        if alg in self.algorithms:
            principal = self._decode_local(token)
        elif alg in ASYMMETRIC and self.key_sets:
            principal = await self._decode_issued(token, header)
        else:
            raise AuthError(f"invalid token: algorithm {str(alg)[:20]!r} is not accepted")
        principal = _identified(principal, token)
        if not await self._current(principal):
            return principal
        if len(self._cache) >= VERIFIED_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[token] = principal
        return principal

    async def _current(self, principal: Principal) -> bool:
        """Raise if the token was revoked; False when that could not be checked (Redis is
        unreachable): the token is then accepted but not cached, so it is checked again."""
        if self.revocations is None:
            return True
        try:
            revoked = await self.revocations.revoked(principal)
        except (RedisError, OSError) as exc:
            log.warning("cannot check token revocations: %s", exc)
            return False
        if revoked:
            raise AuthError("token revoked")
        return True

    def forget(self, user: str) -> None:
        """Drop the user's verified tokens from the cache: their next use is checked again."""
        for token, principal in tuple(self._cache.items()):
            if principal.user == user:
                del self._cache[token]

    def forget_all(self) -> None:
        self._cache.clear()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.settings.jwks_timeout,
                follow_redirects=False,
                trust_env=False,
                headers={"accept": "application/json"},
            )
        return self._http

    def _decode_local(self, token: str) -> Principal:
        claims = self._decode(
            token,
            self.secret,
            self.algorithms,
            self.settings.audience,
            self.settings.issuer,
            ["sub"],
        )
        return _principal(claims, "sub", self.group_claim, self.keep_claims)

    async def _decode_issued(self, token: str, header: Mapping[str, Any]) -> Principal:
        alg = str(header["alg"])
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID):
            raise AuthError("invalid token: unusable `kid`")
        iss = _unverified_issuer(token)
        candidates = [k for k in self.key_sets if k.issuer.issuer and k.issuer.issuer == iss]
        candidates = candidates or [k for k in self.key_sets if not k.issuer.issuer]
        for key_set in candidates:
            key = await key_set.find(kid, alg)
            if key is None:
                continue
            issuer = key_set.issuer
            claims = self._decode(
                token, key.key, [alg], issuer.audience, issuer.issuer, ["exp", issuer.user_claim]
            )
            try:
                issuer.check(claims, time.time(), self.settings.leeway)
            except ClaimsRefused as exc:
                raise AuthError(f"invalid token: {exc}") from None
            return _principal(claims, issuer.user_claim, self.group_claim, self.keep_claims)
        raise AuthError("invalid token: no key of its issuer matches its `kid`")

    def _decode(
        self,
        token: str,
        key: Any,
        algorithms: list[str],
        audience: str,
        issuer: str,
        required: list[str],
    ) -> dict[str, Any]:
        options: dict[str, Any] = {"require": required, "verify_aud": bool(audience)}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=audience or None,
                issuer=issuer or None,
                leeway=self.settings.leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        except (ValueError, TypeError, OverflowError, RecursionError):  # claims pyjwt chokes on
            raise AuthError("invalid token: malformed claims") from None
        return claims

    def mint(self, user: str, ttl: float = 3600.0) -> str:
        if not self.algorithms:
            raise AuthError("auth.algorithms names no HMAC algorithm to sign with")
        now = int(time.time())
        claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + int(ttl)}
        if self.settings.audience:
            claims["aud"] = self.settings.audience
        if self.settings.issuer:
            claims["iss"] = self.settings.issuer
        return jwt.encode(claims, self.secret, algorithm=self.algorithms[0])


def _header(token: str) -> dict[str, Any]:
    try:
        header: dict[str, Any] = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    return header


def _unverified_issuer(token: str) -> str | None:
    """The `iss` the token claims, only to pick which issuer's keys to check it with."""
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise AuthError("invalid token: malformed claims") from None
    iss = payload.get("iss")
    return iss if isinstance(iss, str) else None


def _principal(
    claims: Mapping[str, Any], user_claim: str, group_claim: str = "", keep: bool = False
) -> Principal:
    user = claims.get(user_claim)
    if not isinstance(user, str) or not user or len(user) > 200:
        raise AuthError(f"invalid token: `{user_claim}` must be a non-empty string")
    if (why := text.problem(user)) is not None:
        raise AuthError(f"invalid token: `{user_claim}` {why}")
    issued = claims.get("iat")
    if isinstance(issued, bool) or not isinstance(issued, int | float):
        issued = None
    token_id = next(
        (
            f"{claim}:{value}"
            for claim in ("jti", "sid")
            if isinstance(value := claims.get(claim), str) and 0 < len(value) <= MAX_ID_CHARS
        ),
        "",
    )
    return Principal(
        user,
        _expiry(claims.get("exp")),
        None if issued is None else float(issued),
        token_id,
        _group(claims, group_claim),
        claims if keep else None,
    )


def _group(claims: Mapping[str, Any], group_claim: str) -> str:
    """The budget group the token names; anything but a short string is no group."""
    value = claims.get(group_claim) if group_claim else None
    if isinstance(value, str) and len(value) <= MAX_ID_CHARS and text.problem(value) is None:
        return value
    return ""


def _identified(principal: Principal, token: str) -> Principal:
    """The principal with a `token_id`: the token's own digest when it has no jti or sid."""
    if principal.token_id:
        return principal
    digest = hashlib.sha256(token.encode()).hexdigest()[:32]
    return dataclasses.replace(principal, token_id=f"tok:{digest}")


def _expiry(exp: object) -> float | None:
    if exp is None:
        return None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not 0 <= exp <= MAX_SEQ:
        raise AuthError("invalid token: `exp` must be a Unix time")
    return float(exp)


def _check_shape(token: str) -> None:
    """Refuse a token too long or too deeply nested for its JSON parts to be decoded safely,
    before pyjwt decodes them (it does so before checking the signature)."""
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError(f"invalid token: longer than {MAX_TOKEN_CHARS} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("invalid token: a JWT has three parts")
    for part in parts[:2]:
        try:
            raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        except (ValueError, binascii.Error):
            raise AuthError("invalid token: not base64url") from None
        if too_deep(raw, MAX_PART_DEPTH):
            raise AuthError("invalid token: its JSON nests too deeply")


def load_secret(settings: AuthSettings, data_dir: Path) -> str:
    """The configured secret, else one generated once into the data directory."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as out:
        out.write(secret)
    return secret
