"""Tokens for tests and benchmarks: the shared secret, `mint`, fresh user names."""

from __future__ import annotations

import time
import uuid

import jwt

SECRET = "parley-test-secret-0123456789abcdef0123456789"


def mint(user: str, ttl: float = 3600, secret: str = SECRET, **claims: object) -> str:
    now = int(time.time())
    payload: dict[str, object] = {"sub": user, "iat": now, "exp": now + int(ttl), **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def new_user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"
