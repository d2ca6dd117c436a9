"""Tokens of identity providers, checked by the verifier against a real local JWKS server.

No Parley process here: the `Verifier` fetches real key sets over HTTP from `LocalIdP` on
127.0.0.1 (tests/helpers/idp.py), with keys each test generates.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jwt
import pytest
import pytest_asyncio
from jwt.algorithms import RSAAlgorithm

from server.app.config import AuthSettings, ConfigError, IssuerSettings, Settings
from server.edge.auth import AuthError, Verifier
from server.edge.issuers import resolve
from tests.helpers.idp import (
    PRESETS,
    SECRET,
    LocalIdP,
    Signer,
    issuer_url,
    make_verifier,
    preset_verifier,
    shaped,
    unsigned,
)


@pytest.fixture
def idp() -> Iterator[LocalIdP]:
    server = LocalIdP([Signer.rsa(), Signer.ec(), Signer.ed25519()]).start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def verifier(idp: LocalIdP) -> AsyncIterator[Verifier]:
    v = make_verifier(idp)
    yield v
    await v.close()


@pytest.mark.parametrize("provider", [*PRESETS, "oidc"])
@pytest.mark.parametrize("key", [0, 1, 2], ids=["RS256", "ES256", "EdDSA"])
async def test_each_preset_accepts_a_token_shaped_like_its_providers(
    idp: LocalIdP, verifier: Verifier, provider: str, key: int
) -> None:
    user = f"user_{uuid.uuid4().hex[:8]}"
    token = idp.signers[key].sign(shaped(provider, issuer_url(idp.base, provider), user))
    principal = await verifier.verify(token)
    assert principal.user == user and principal.expires_at is not None


async def test_preset_urls_have_the_providers_shapes(idp: LocalIdP, verifier: Verifier) -> None:
    for provider in [*PRESETS, "oidc"]:
        token = idp.signers[0].sign(shaped(provider, issuer_url(idp.base, provider), "u"))
        await verifier.verify(token)
    assert idp.hits == {
        "/clerk/.well-known/jwks.json": 1,
        "/sb/auth/v1/.well-known/jwks.json": 1,
        "/auth0/.well-known/jwks.json": 1,
        "/realms/parley/protocol/openid-connect/certs": 1,
        "/firebase/jwk": 1,
        "/oidc/.well-known/openid-configuration": 1,
        "/oidc/jwks.json": 1,
    }


def test_presets_derive_the_real_urls_and_audiences() -> None:
    auth = AuthSettings(
        issuers=[
            IssuerSettings(provider="supabase", project="abcd"),
            IssuerSettings(provider="auth0", domain="t.eu.auth0.com", audience="api"),
            IssuerSettings(provider="clerk", domain="clerk.example.com"),
            IssuerSettings(provider="keycloak", domain="id.example.com", realm="r"),
            IssuerSettings(provider="firebase", project="p1"),
        ]
    )
    got = [(i.issuer, i.jwks_url, i.audience) for i in resolve(Settings(auth=auth))]
    assert got == [
        (
            "https://abcd.supabase.co/auth/v1",
            "https://abcd.supabase.co/auth/v1/.well-known/jwks.json",
            "authenticated",
        ),
        ("https://t.eu.auth0.com/", "https://t.eu.auth0.com/.well-known/jwks.json", "api"),
        ("https://clerk.example.com", "https://clerk.example.com/.well-known/jwks.json", ""),
        (
            "https://id.example.com/realms/r",
            "https://id.example.com/realms/r/protocol/openid-connect/certs",
            "",
        ),
        (
            "https://securetoken.google.com/p1",
            "https://www.googleapis.com/service_accounts/v1/jwk/"
            "securetoken@system.gserviceaccount.com",
            "p1",
        ),
    ]


@pytest.mark.parametrize(
    "issuer",
    [
        IssuerSettings(provider="auth0", domain="t.auth0.com"),
        IssuerSettings(provider="clerk"),
        IssuerSettings(provider="okta", issuer="https://x"),
        IssuerSettings(jwks_url="http://keys.example.com/jwks.json"),
    ],
    ids=["auth0-without-audience", "clerk-without-domain", "unknown-provider", "plain-http"],
)
def test_incomplete_or_unsafe_issuers_stop_start_up(issuer: IssuerSettings) -> None:
    with pytest.raises(ConfigError):
        resolve(Settings(auth=AuthSettings(issuers=[issuer])))


@pytest.mark.parametrize("spelling", ["none", "None", "NONE", "nOnE", " none", "none "])
@pytest.mark.parametrize("signature", [b"", b"x" * 32])
async def test_alg_none_is_refused_in_every_spelling(
    idp: LocalIdP, verifier: Verifier, spelling: str, signature: bytes
) -> None:
    claims = shaped("clerk", issuer_url(idp.base, "clerk"), "mallory")
    header = {"alg": spelling, "typ": "JWT", "kid": idp.signers[0].kid}
    with pytest.raises(AuthError, match="not accepted"):
        await verifier.verify(unsigned(header, claims, signature))


async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    idp: LocalIdP, verifier: Verifier
) -> None:
    signer = idp.signers[0]
    pem = signer.jwk()["n"].encode()  # what an attacker can read from the JWKS
    claims = shaped("clerk", issuer_url(idp.base, "clerk"), "mallory")
    header = {"alg": "HS256", "typ": "JWT", "kid": signer.kid}
    body = unsigned(header, claims).rsplit(".", 1)[0]
    for secret in (pem, json.dumps(signer.jwk()).encode()):
        sig = hmac.new(secret, body.encode(), hashlib.sha256).digest()
        with pytest.raises(AuthError):
            await verifier.verify(unsigned(header, claims, sig))


async def test_an_rs256_token_is_refused_when_only_hs256_is_configured(idp: LocalIdP) -> None:
    plain = Verifier(AuthSettings(jwt_secret=SECRET), SECRET)
    token = idp.signers[0].sign({"sub": "ann", "exp": time.time() + 60})
    with pytest.raises(AuthError, match="not accepted"):
        await plain.verify(token)
    assert idp.fetches() == 0


async def test_the_local_secret_keeps_working_beside_the_issuers(verifier: Verifier) -> None:
    token = jwt.encode({"sub": "ann", "exp": time.time() + 60}, SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).user == "ann"


@pytest.mark.parametrize(
    "kid",
    ["k" * 100_000, "ключ-🔑", "../../etc/passwd", "/dev/zero", "%2e%2e%2f", 12345, ["a"]],
    ids=["huge", "unicode", "path", "device", "escaped", "number", "list"],
)
async def test_hostile_kids_are_refused_cleanly(
    idp: LocalIdP, verifier: Verifier, kid: object, caplog: pytest.LogCaptureFixture
) -> None:
    claims = shaped("clerk", issuer_url(idp.base, "clerk"), "mallory")
    body = unsigned({"alg": "RS256", "typ": "JWT", "kid": kid}, claims).rsplit(".", 1)[0]
    signature = RSAAlgorithm(RSAAlgorithm.SHA256).sign(body.encode(), idp.signers[0].private)
    token = f"{body}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    with caplog.at_level(logging.WARNING), pytest.raises(AuthError):
        await verifier.verify(token)
    assert not [r for r in caplog.records if r.exc_info]
    assert all("etc" not in path and "dev" not in path for path in idp.hits)


async def test_jku_x5u_and_jwk_headers_are_never_followed(
    idp: LocalIdP, verifier: Verifier
) -> None:
    attacker = LocalIdP([Signer.rsa(kid=idp.signers[0].kid)]).start()
    try:
        evil = attacker.signers[0]
        claims = shaped("clerk", issuer_url(idp.base, "clerk"), "mallory")
        for header in (
            {"jku": f"{attacker.base}/evil/jwks.json"},
            {"x5u": f"{attacker.base}/evil/cert.pem"},
            {"jwk": evil.jwk()},
            {"jku": f"{attacker.base}/evil/jwks.json", "jwk": evil.jwk()},
        ):
            with pytest.raises(AuthError):
                await verifier.verify(evil.sign(claims, **header))
        assert attacker.fetches() == 0
    finally:
        attacker.stop()


HOSTILE_KEY_SETS = {
    "garbage": (200, b"\x00{not json"),
    "huge": (200, b'{"keys": [' + b'{"kty": "RSA"},' * 40_000 + b"{}]}"),
    "deep": (200, b'{"keys": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "not an object": (200, b"[]"),
    "keys not a list": (200, b'{"keys": 5}'),
    "only a secret key": (200, b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k"}]}'),
    "malformed keys": (200, b'{"keys": [{"kty": "RSA", "n": 5, "e": "AQAB"}, 7, null]}'),
    "redirect": (302, b""),
    "server error": (500, b"oops"),
}


@pytest.mark.parametrize("kind", HOSTILE_KEY_SETS)
async def test_a_hostile_key_set_refuses_its_tokens_cleanly(
    idp: LocalIdP, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever the JWKS endpoint answers, its tokens are refused with an AuthError (no
    other exception, no traceback logged) and the local secret keeps working."""
    idp.raw = HOSTILE_KEY_SETS[kind]
    async with preset_verifier(idp) as verifier:
        token = idp.signers[0].sign(shaped("clerk", issuer_url(idp.base, "clerk"), "a"))
        with caplog.at_level(logging.WARNING), pytest.raises(AuthError):
            await asyncio.wait_for(verifier.verify(token), 10)
        local = jwt.encode({"sub": "b", "exp": time.time() + 60}, SECRET, algorithm="HS256")
        assert (await verifier.verify(local)).user == "b"
    assert not [r for r in caplog.records if r.exc_info]
    assert not idp.fetches("/elsewhere/jwks.json")  # a redirect is never followed


async def test_a_flood_of_unknown_kids_costs_at_most_one_fetch(
    idp: LocalIdP, verifier: Verifier
) -> None:
    claims = shaped("clerk", issuer_url(idp.base, "clerk"), "mallory")
    await verifier.verify(idp.signers[0].sign(claims))
    assert idp.fetches() == 1
    forger = Signer.rsa()
    tokens = [forger.sign(claims, kid=f"unknown-{i}") for i in range(1000)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, AuthError) for r in results)
    assert idp.fetches() == 1  # the set was fetched within jwks_min_refresh: none now


async def test_a_cold_flood_of_unknown_kids_shares_one_fetch(idp: LocalIdP) -> None:
    async with preset_verifier(idp) as verifier:
        forger = Signer.rsa()
        claims = shaped("clerk", issuer_url(idp.base, "clerk"), "mallory")
        tokens = [forger.sign(claims, kid=f"unknown-{i}") for i in range(1000)]
        results = await asyncio.gather(
            *(verifier.verify(t) for t in tokens), return_exceptions=True
        )
        assert all(isinstance(r, AuthError) for r in results)
        assert idp.fetches() == 1


@pytest.mark.parametrize("provider", PRESETS)
async def test_stale_keys_keep_verifying_while_the_endpoint_is_down(
    idp: LocalIdP, provider: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with preset_verifier(idp, jwks_cache_seconds=0.2, jwks_min_refresh=0.2) as verifier:
        issuer = issuer_url(idp.base, provider)
        assert await verifier.verify(idp.signers[0].sign(shaped(provider, issuer, "a")))
        idp.down = True
        await asyncio.sleep(0.3)
        with caplog.at_level(logging.WARNING):
            token = idp.signers[1].sign(shaped(provider, issuer, "b"))
            assert (await verifier.verify(token)).user == "b"
        assert idp.fetches() == 3  # the first, then a failed attempt and its retry
        assert "serving the 3 keys held" in caplog.text
        assert not [r for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("provider", PRESETS)
async def test_a_rotated_key_is_picked_up(idp: LocalIdP, provider: str) -> None:
    async with preset_verifier(idp, jwks_min_refresh=0.2) as verifier:
        issuer = issuer_url(idp.base, provider)
        await verifier.verify(idp.signers[1].sign(shaped(provider, issuer, "a")))
        rotated = Signer.ec()
        idp.signers = [rotated]
        await asyncio.sleep(0.25)
        assert (await verifier.verify(rotated.sign(shaped(provider, issuer, "b")))).user == "b"
        with pytest.raises(AuthError):  # the key rotated away no longer verifies
            await verifier.verify(Signer.ec(kid="gone").sign(shaped(provider, issuer, "c")))
        assert idp.fetches() == 2


@pytest.mark.parametrize("provider", PRESETS)
async def test_a_slow_endpoint_times_out_after_one_retry(idp: LocalIdP, provider: str) -> None:
    idp.delay = 1.5
    async with preset_verifier(idp, jwks_timeout=0.2) as verifier:
        token = idp.signers[0].sign(shaped(provider, issuer_url(idp.base, provider), "a"))
        started = time.monotonic()
        with pytest.raises(AuthError):
            await verifier.verify(token)
        assert time.monotonic() - started < 1.2  # two 0.2 s attempts, not 1.5 s each
        assert idp.fetches() == 2


async def test_a_trickling_endpoint_is_cut_at_the_timeout(idp: LocalIdP) -> None:
    """Headers at once, then a byte every 50 ms: every read is quick, the whole is not."""
    idp.trickle = 0.05
    async with preset_verifier(idp, jwks_timeout=0.3) as verifier:
        token = idp.signers[0].sign(shaped("clerk", issuer_url(idp.base, "clerk"), "a"))
        started = time.monotonic()
        with pytest.raises(AuthError):
            await asyncio.wait_for(verifier.verify(token), 10)
        assert time.monotonic() - started < 1.5  # two 0.3 s attempts
        assert idp.fetches() == 2


async def test_a_slow_fetch_never_blocks_the_event_loop(idp: LocalIdP) -> None:
    """While a key set takes 0.8 s to arrive, the loop keeps running: a timer ticks and a
    token of the local secret is verified long before the fetch ends."""
    idp.delay = 0.8
    async with preset_verifier(idp) as verifier:
        token = idp.signers[0].sign(shaped("auth0", issuer_url(idp.base, "auth0"), "a"))
        fetching = asyncio.create_task(verifier.verify(token))
        ticks = 0
        started = time.monotonic()
        while not fetching.done() and ticks < 200:
            await asyncio.sleep(0.02)
            ticks += 1
        local = jwt.encode({"sub": "b", "exp": time.time() + 60}, SECRET, algorithm="HS256")
        assert (await verifier.verify(local)).user == "b"
        assert (await fetching).user == "a"
        assert time.monotonic() - started >= 0.7 and ticks >= 10


@pytest.mark.parametrize("publish_alg", [True, False], ids=["alg-in-jwk", "no-alg-in-jwk"])
async def test_every_algorithm_is_verified_by_its_kid(publish_alg: bool) -> None:
    """One key set holding a key for each algorithm: each token finds its key by `kid`; a
    token naming another key's `kid` is refused."""
    signers = [Signer.rsa(alg=alg) for alg in ("RS256", "RS384", "RS512", "PS256")]
    signers += [Signer.ec(alg="ES256"), Signer.ec(alg="ES384"), Signer.ed25519()]
    idp = LocalIdP(signers, publish_alg=publish_alg).start()
    auth = AuthSettings(jwks_url=f"{idp.base}/any/jwks.json")
    try:
        async with verifier_for(auth) as verifier:
            for signer in signers:
                claims = {"sub": f"user-{signer.alg}", "exp": time.time() + 60}
                principal = await verifier.verify(signer.sign(claims))
                assert principal.user == f"user-{signer.alg}"
                other = next(s for s in signers if s.alg != signer.alg).kid
                with pytest.raises(AuthError):
                    await verifier.verify(signer.sign(claims | {"n": 1}, kid=other))
        assert {s.alg for s in signers} == {
            "RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
        }  # fmt: skip
        assert idp.fetches() == 1
    finally:
        idp.stop()


async def test_cache_control_max_age_is_honoured(idp: LocalIdP) -> None:
    idp.max_age = 1
    async with preset_verifier(idp, jwks_min_refresh=0.1) as verifier:
        issuer = issuer_url(idp.base, "auth0")
        await verifier.verify(idp.signers[0].sign(shaped("auth0", issuer, "a")))
        await verifier.verify(idp.signers[0].sign(shaped("auth0", issuer, "b")))
        assert idp.fetches() == 1
        await asyncio.sleep(1.1)
        await verifier.verify(idp.signers[0].sign(shaped("auth0", issuer, "c")))
        assert idp.fetches() == 2


@pytest.mark.parametrize(
    ("extra", "accepted"),
    [
        ({"role": "authenticated"}, True),
        ({"role": "service_role"}, False),
        ({"role": "anon"}, False),
        ({"is_anonymous": True}, False),
        ({"role": None}, False),
    ],
)
async def test_supabase_roles(
    idp: LocalIdP, verifier: Verifier, extra: dict[str, Any], accepted: bool
) -> None:
    claims = shaped("supabase", issuer_url(idp.base, "supabase"), "u", **extra)
    token = idp.signers[1].sign({k: v for k, v in claims.items() if v is not None})
    if accepted:
        assert (await verifier.verify(token)).user == "u"
    else:
        with pytest.raises(AuthError):
            await verifier.verify(token)


@contextlib.asynccontextmanager
async def verifier_for(auth: AuthSettings) -> AsyncIterator[Verifier]:
    settings = Settings(auth=auth)
    verifier = Verifier(settings.auth, SECRET, resolve(settings))
    try:
        yield verifier
    finally:
        await verifier.close()


async def test_supabase_anonymous_users_when_allowed(idp: LocalIdP) -> None:
    base = idp.base
    auth = AuthSettings(
        provider="supabase", project="x", issuer=f"{base}/sb/auth/v1", allow_anonymous=True
    )
    async with verifier_for(auth) as verifier:
        claims = shaped("supabase", f"{base}/sb/auth/v1", "guest", is_anonymous=True)
        assert (await verifier.verify(idp.signers[1].sign(claims))).user == "guest"
        service = shaped("supabase", f"{base}/sb/auth/v1", "svc", role="service_role")
        with pytest.raises(AuthError):
            await verifier.verify(idp.signers[1].sign(service))


async def test_clerk_azp_must_be_an_allowed_origin(idp: LocalIdP, verifier: Verifier) -> None:
    issuer = issuer_url(idp.base, "clerk")
    evil = idp.signers[0].sign(shaped("clerk", issuer, "u", azp="https://evil.example"))
    with pytest.raises(AuthError, match="azp"):
        await verifier.verify(evil)


async def test_firebase_auth_time_in_the_future_is_refused(
    idp: LocalIdP, verifier: Verifier
) -> None:
    issuer = issuer_url(idp.base, "firebase")
    claims = shaped("firebase", issuer, "u", auth_time=int(time.time()) + 3600)
    with pytest.raises(AuthError, match="auth_time"):
        await verifier.verify(idp.signers[0].sign(claims))


async def test_each_issuer_checks_its_own_audience(idp: LocalIdP, verifier: Verifier) -> None:
    """Several issuers at once, each with its own audience: a token of one issuer carrying
    another issuer's audience is refused, with its own it is accepted."""
    audiences = {"supabase": "authenticated", "auth0": "https://api.parley.test"}
    audiences["firebase"] = "proj"
    for provider, own in audiences.items():
        issuer = issuer_url(idp.base, provider)
        assert await verifier.verify(idp.signers[0].sign(shaped(provider, issuer, "u", aud=own)))
        for other in set(audiences.values()) - {own}:
            token = idp.signers[0].sign(shaped(provider, issuer, "u", aud=other))
            with pytest.raises(AuthError, match=r"(?i)audience"):
                await verifier.verify(token)


async def test_user_claim_names_the_user(idp: LocalIdP) -> None:
    auth = AuthSettings(jwks_url=f"{idp.base}/any/jwks.json", user_claim="user_id")
    async with verifier_for(auth) as verifier:
        token = idp.signers[2].sign({"sub": "s", "user_id": "uid-7", "exp": time.time() + 60})
        assert (await verifier.verify(token)).user == "uid-7"
