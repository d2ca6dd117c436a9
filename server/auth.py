"""JWT verification and minting (pyjwt). The algorithm list is pinned by configuration."""

from __future__ import annotations

import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

from protocol import text
from server.config import AuthSettings

SECRET_FILE = "jwt_secret"
VERIFIED_CACHE_SIZE = 10_000


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
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 200:
            raise AuthError("invalid token: `sub` must be a non-empty string")
        if (why := text.problem(sub)) is not None:
            raise AuthError(f"invalid token: `sub` {why}")
        exp = claims.get("exp")
        expires_at = float(exp) + self.settings.leeway if isinstance(exp, int | float) else None
        return Principal(sub, expires_at)

    def mint(self, user: str, ttl: float = 3600.0) -> str:
        now = int(time.time())
        claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + int(ttl)}
        if self.settings.audience:
            claims["aud"] = self.settings.audience
        if self.settings.issuer:
            claims["iss"] = self.settings.issuer
        return jwt.encode(claims, self.secret, algorithm=self.algorithms[0])


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
