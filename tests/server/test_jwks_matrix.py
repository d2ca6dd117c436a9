"""Hypothesis: combinations of claims and headers across presets, checked against a
plain-Python oracle of what each provider's rules accept. The verifier is the real one,
fetching the key set from the local JWKS server (tests/helpers/idp.py); no Parley process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.edge.auth import AuthError, Verifier
from tests.helpers.idp import ORIGIN, LocalIdP, Signer, issuer_url, make_verifier, shaped, unsigned

AUDIENCE = {"clerk": "", "supabase": "authenticated", "auth0": "https://api.parley.test"}
AUDIENCE |= {"firebase": "proj", "keycloak": ""}
ABSENT = "<absent>"

# Each dimension leans towards its valid value so that accepted tokens are common too.
cases = st.fixed_dictionaries(
    {
        "provider": st.sampled_from(sorted(AUDIENCE)),
        "signer": st.sampled_from([0, 1, 2]),
        "alg": st.sampled_from(["own"] * 6 + ["HS256-with-public-key", "none"]),
        "kid": st.sampled_from(["right"] * 5 + ["unknown", "missing"]),
        "exp": st.sampled_from([3600] * 4 + [ABSENT, -3600, -100, 100]),
        "nbf": st.sampled_from([ABSENT] * 4 + [-100, 100]),
        "iat": st.sampled_from([-100] * 4 + [ABSENT, 3600]),
        "iss": st.sampled_from(["right"] * 6 + ["other", ABSENT]),
        "aud": st.sampled_from(["right"] * 4 + ["other", ABSENT, "list"]),
        "azp": st.sampled_from([ABSENT, ORIGIN, "https://evil.example"]),
        "role": st.sampled_from(["authenticated"] * 3 + [ABSENT, "anon", "service_role"]),
    }
)


def oracle(case: dict[str, Any]) -> bool:
    """What the rules say, written out plainly (leeway 10 s; offsets are far from it)."""
    provider, audience = case["provider"], AUDIENCE[case["provider"]]
    if case["alg"] != "own" or case["kid"] == "unknown":
        return False
    if case["exp"] == ABSENT or case["exp"] < 0:
        return False
    if case["nbf"] == 100 or case["iat"] == 3600 or case["iss"] != "right":
        return False
    if audience and case["aud"] not in ("right", "list"):
        return False
    if provider == "clerk" and case["azp"] == "https://evil.example":
        return False
    return provider != "supabase" or case["role"] == "authenticated"


def token_for(idp: LocalIdP, case: dict[str, Any], now: int) -> str:
    provider, signer = case["provider"], idp.signers[case["signer"]]
    issuer = issuer_url(idp.base, provider)
    claims = shaped(provider, issuer, "u")
    wanted = {
        "exp": case["exp"] if case["exp"] == ABSENT else now + case["exp"],
        "nbf": case["nbf"] if case["nbf"] == ABSENT else now + case["nbf"],
        "iat": case["iat"] if case["iat"] == ABSENT else now + case["iat"],
        "iss": {"right": issuer, "other": f"{idp.base}/elsewhere"}.get(case["iss"], ABSENT),
        "aud": {
            "right": AUDIENCE[provider] or "any",
            "other": "someone-else",
            "list": ["x", AUDIENCE[provider] or "any"],
        }.get(case["aud"], ABSENT),
        "azp": case["azp"],
        "role": case["role"],
    }
    for key, value in wanted.items():
        claims.pop(key, None)
        if value != ABSENT:
            claims[key] = value
    header: dict[str, Any] = {}
    if case["kid"] != "missing":
        header["kid"] = signer.kid if case["kid"] == "right" else "rotated-away"
    if case["alg"] == "none":
        return unsigned({"alg": "none", **header}, claims)
    if case["alg"] == "HS256-with-public-key":
        body = unsigned({"alg": "HS256", **header}, claims).rsplit(".", 1)[0]
        mac = hmac.new(json.dumps(signer.jwk()).encode(), body.encode(), hashlib.sha256)
        return unsigned({"alg": "HS256", **header}, claims, mac.digest())
    return jwt.encode(claims, signer.private, algorithm=signer.alg, headers=header)


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[LocalIdP, Verifier, asyncio.AbstractEventLoop]]:
    idp = LocalIdP([Signer.rsa(), Signer.ec(), Signer.ed25519()]).start()
    loop = asyncio.new_event_loop()
    verifier = make_verifier(idp)
    yield idp, verifier, loop
    loop.run_until_complete(verifier.close())
    loop.close()
    idp.stop()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=cases)
def test_claims_matrix_matches_the_oracle(
    world: tuple[LocalIdP, Verifier, asyncio.AbstractEventLoop], case: dict[str, Any]
) -> None:
    idp, verifier, loop = world
    token = token_for(idp, case, int(time.time()))
    try:
        loop.run_until_complete(verifier.verify(token))
        accepted = True
    except AuthError:
        accepted = False
    assert accepted == oracle(case), case
    assert idp.fetches() <= len(AUDIENCE)  # one per issuer; unknown kids within 30 s: none
