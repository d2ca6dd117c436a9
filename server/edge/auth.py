"""JWT verification and minting (pyjwt). The algorithm list is pinned by configuration."""

from __future__ import annotations

import base64
import binascii
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from protocol import text
from protocol.frames import MAX_SEQ, MAX_TOKEN_CHARS
from protocol.jsondepth import too_deep
from server.app.config import AuthSettings

SECRET_FILE = "jwt_secret"
VERIFIED_CACHE_SIZE = 10_000
MAX_PART_DEPTH = 4
"""A JWT header or claims set nests no deeper than this (`aud` as a list is 2)."""


class AuthError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    expires_at: float | None


class Verifier:
    def __init__(self, settings: AuthSettings, secret: str) -> None:
        algorithms = [a for a in settings.algorithms if a.lower() != "none"]
        if not algorithms:
            raise AuthError("auth.algorithms names no usable algorithm")
        self.settings = settings
        self.secret = secret
        self.algorithms = algorithms
        self._cache: dict[str, Principal] = {}

    def verify(self, token: str) -> Principal:
        """Check a token; one already checked is answered from a bounded cache until it
        expires (a reconnecting tab, or a load test's thousand sockets, reuse theirs)."""
        cached = self._cache.get(token)
        if cached is not None and (cached.expires_at or math.inf) > time.time():
            return cached
        principal = self._decode(token)
        if len(self._cache) >= VERIFIED_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[token] = principal
        return principal

    def _decode(self, token: str) -> Principal:
        _check_shape(token)
        options: dict[str, bool | list[str]] = {"require": ["sub"]}
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=self.algorithms,
                audience=self.settings.audience or None,
                issuer=self.settings.issuer or None,
                leeway=self.settings.leeway,
                options=options,  # type: ignore[arg-type]
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        except (ValueError, TypeError, OverflowError, RecursionError):  # claims pyjwt chokes on
            raise AuthError("invalid token: malformed claims") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 200:
            raise AuthError("invalid token: `sub` must be a non-empty string")
        if (why := text.problem(sub)) is not None:
            raise AuthError(f"invalid token: `sub` {why}")
        return Principal(sub, self._expiry(claims.get("exp")))

    def _expiry(self, exp: object) -> float | None:
        if exp is None:
            return None
        if isinstance(exp, bool) or not isinstance(exp, int | float) or not 0 <= exp <= MAX_SEQ:
            raise AuthError("invalid token: `exp` must be a Unix time")
        return float(exp) + self.settings.leeway

    def mint(self, user: str, ttl: float = 3600.0) -> str:
        now = int(time.time())
        claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + int(ttl)}
        if self.settings.audience:
            claims["aud"] = self.settings.audience
        if self.settings.issuer:
            claims["iss"] = self.settings.issuer
        return jwt.encode(claims, self.secret, algorithm=self.algorithms[0])


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
