from __future__ import annotations

import asyncio
import time
from pathlib import Path

import jwt
import pytest

from server.app.config import AuthSettings
from server.edge.auth import AuthError, Verifier, load_secret

SECRET = "x" * 40


async def test_valid_token_gives_the_user_and_is_cached_until_it_expires() -> None:
    verifier = Verifier(AuthSettings(leeway=0), SECRET)
    token = jwt.encode({"sub": "ann", "exp": time.time() + 1.5}, SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).user == "ann"
    assert (await verifier.verify(token)).user == "ann"
    await asyncio.sleep(1.6)
    with pytest.raises(AuthError, match="expired"):
        await verifier.verify(token)


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 60},
        {"sub": "", "exp": 60},
        {"sub": "a", "nbf": 600},
    ],
)
async def test_missing_sub_or_not_yet_valid_is_refused(claims: dict[str, int | str]) -> None:
    """Times are seconds from when the test runs (not from collection, minutes earlier)."""
    now = time.time()
    token = {k: now + v if k in ("exp", "nbf") else v for k, v in claims.items()}
    verifier = Verifier(AuthSettings(leeway=0), SECRET)
    with pytest.raises(AuthError):
        await verifier.verify(jwt.encode(token, SECRET, algorithm="HS256"))


async def test_audience_and_issuer_are_checked_when_configured() -> None:
    verifier = Verifier(AuthSettings(audience="parley", issuer="https://id.example"), SECRET)
    good = verifier.mint("bob")
    assert (await verifier.verify(good)).user == "bob"
    other = jwt.encode({"sub": "bob", "aud": "else", "iss": "https://id.example"}, SECRET, "HS256")
    with pytest.raises(AuthError):
        await verifier.verify(other)


def test_none_is_never_an_algorithm() -> None:
    with pytest.raises(AuthError):
        Verifier(AuthSettings(algorithms=["none"]), SECRET)


def test_secret_is_generated_once(tmp_path: Path) -> None:
    first = load_secret(AuthSettings(), tmp_path)
    assert len(first) > 40 and load_secret(AuthSettings(), tmp_path) == first
    assert (tmp_path / "jwt_secret").stat().st_mode & 0o777 == 0o600


async def test_the_verified_claims_are_kept_only_when_asked() -> None:
    """The connect hook sends a socket's claims; without one a principal holds none."""
    token = jwt.encode({"sub": "ann", "org": "acme", "exp": time.time() + 60}, SECRET, "HS256")
    assert (await Verifier(AuthSettings(), SECRET).verify(token)).claims is None
    keeping = Verifier(AuthSettings(), SECRET)
    keeping.keep_claims = True
    claims = (await keeping.verify(token)).claims
    assert claims is not None and (claims["sub"], claims["org"]) == ("ann", "acme")
