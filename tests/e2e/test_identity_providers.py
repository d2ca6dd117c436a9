"""A real Parley process verifying identity providers' tokens against a real local JWKS server,
through the `websockets` client: every preset, the in-band `refresh`, and never a 1011."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.helpers.auth import mint, new_user
from tests.helpers.idp import ORIGIN, PRESETS, LocalIdP, Signer, issuer_url, preset_issuers, shaped
from tests.helpers.processes import Cluster, Db, ParleyProcess, redis_db

HINT, GRACE = 2.0, 2.0


@pytest.fixture(scope="module")
def idp() -> Iterator[LocalIdP]:
    server = LocalIdP([Signer.rsa(), Signer.ec(), Signer.ed25519()]).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(cluster: Cluster, idp: LocalIdP) -> Iterator[ParleyProcess]:
    issuers = msgspec.json.encode(preset_issuers(idp.base)).decode()
    proc = cluster.process(
        "serve",
        PARLEY_AUTH_ISSUERS=issuers,
        PARLEY_SERVER_ALLOWED_ORIGINS=ORIGIN,
        PARLEY_AUTH_REFRESH_HINT=str(HINT),
        PARLEY_AUTH_REFRESH_GRACE=str(GRACE),
        PARLEY_AUTH_LEEWAY="0",
        REDIS_URL=redis_db(cluster.services.redis_url, Db.IDENTITY),
    )
    yield proc
    proc.stop()
    log = proc.log()
    assert "Traceback" not in log and "1011" not in log


async def first_frame(server: ParleyProcess, token: str) -> dict[str, Any]:
    async with websockets.connect(
        server.ws_url, subprotocols=["parley.v1", f"bearer.{token}"]
    ) as ws:  # type: ignore[list-item]
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        return frame


@contextlib.asynccontextmanager
async def hinted(
    server: ParleyProcess, token: str
) -> AsyncIterator[tuple[ClientConnection, dict[str, Any], dict[str, Any]]]:
    """A socket signed in with a short-lived `token`: its `ready`, then its `refresh` hint."""
    async with websockets.connect(
        server.ws_url, subprotocols=["parley.v1", f"bearer.{token}"]
    ) as ws:  # type: ignore[list-item]
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        hint = json.loads(await asyncio.wait_for(ws.recv(), 5))
        yield ws, ready, hint


async def close_code(server: ParleyProcess, token: str) -> int | None:
    try:
        await first_frame(server, token)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else None
    return None


@pytest.mark.parametrize("provider", [*PRESETS, "oidc"])
async def test_each_presets_token_opens_a_socket(
    server: ParleyProcess, idp: LocalIdP, provider: str
) -> None:
    user = new_user()
    for signer in idp.signers:
        token = signer.sign(shaped(provider, issuer_url(idp.base, provider), user))
        ready = await first_frame(server, token)
        assert ready["type"] == "ready" and ready["user"] == user


async def test_refused_tokens_close_4401_and_headers_are_never_followed(
    server: ParleyProcess, idp: LocalIdP
) -> None:
    attacker = LocalIdP([Signer.rsa(kid=idp.signers[0].kid)]).start()
    try:
        claims = shaped("clerk", issuer_url(idp.base, "clerk"), new_user())
        evil = attacker.signers[0]
        refused = [
            evil.sign(claims, jku=f"{attacker.base}/k/jwks.json"),
            evil.sign(claims, x5u=f"{attacker.base}/k/cert.pem", jwk=evil.jwk()),
            Signer.rsa().sign(claims, kid="../../../etc/passwd"),
            idp.signers[1].sign({**claims, "azp": "https://evil.example"}),
            idp.signers[1].sign(
                shaped("supabase", issuer_url(idp.base, "supabase"), "s", role="service_role")
            ),
            mint("x", secret="wrong-secret" * 4),
        ]
        for token in refused:
            assert await close_code(server, token) == 4401
        assert attacker.fetches() == 0
    finally:
        attacker.stop()


async def test_local_secret_tokens_still_work(server: ParleyProcess) -> None:
    user = new_user()
    assert (await first_frame(server, mint(user)))["user"] == user


async def test_refresh_hint_then_a_fresh_auth_frame_keeps_the_socket(
    server: ParleyProcess, idp: LocalIdP
) -> None:
    """A Clerk-like 3 s token: `refresh` 2 s before expiry; the fresh token is sent after
    expiry, within the grace, and the socket lives on past expiry + grace."""
    user, issuer, signer = new_user(), issuer_url(idp.base, "clerk"), idp.signers[0]
    token = signer.sign(shaped("clerk", issuer, user, ttl=3))
    async with hinted(server, token) as (ws, ready, hint):
        assert hint == {"type": "refresh", "expires_at": ready["expires_at"]}
        await asyncio.sleep(max(0.0, ready["expires_at"] + 0.5 - time.time()))
        fresh = signer.sign(shaped("clerk", issuer, user, ttl=60))
        await ws.send(json.dumps({"type": "auth", "token": fresh, "ref": "r"}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert ack["type"] == "ack" and ack["ref"] == "r" and ack["expires_at"] > time.time()
        await asyncio.sleep(max(0.0, ready["expires_at"] + GRACE + 0.5 - time.time()))
        await ws.send(json.dumps({"type": "ping", "ref": "p"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"


async def test_no_fresh_token_closes_4401_only_after_the_grace(
    server: ParleyProcess, idp: LocalIdP
) -> None:
    token = idp.signers[2].sign(shaped("keycloak", issuer_url(idp.base, "keycloak"), "k", ttl=2))
    async with hinted(server, token) as (ws, ready, hint):
        assert hint["type"] == "refresh"
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), ready["expires_at"] + GRACE + 5 - time.time())
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert time.time() >= ready["expires_at"] + GRACE - 0.1


async def test_an_expired_token_sent_during_the_grace_closes_at_once(
    server: ParleyProcess, idp: LocalIdP
) -> None:
    """Within the grace the socket still works; an `auth` frame with a token that has
    expired too does not renew it: 4401 at once, before the grace is over."""
    user, issuer, signer = new_user(), issuer_url(idp.base, "auth0"), idp.signers[1]
    token = signer.sign(shaped("auth0", issuer, user, ttl=2))
    async with hinted(server, token) as (ws, ready, hint):
        assert hint["type"] == "refresh"
        await asyncio.sleep(max(0.0, ready["expires_at"] + 0.2 - time.time()))
        await ws.send(json.dumps({"type": "ping", "ref": "p"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "pong"
        stale = signer.sign(shaped("auth0", issuer, user, ttl=-60))
        await ws.send(json.dumps({"type": "auth", "token": stale, "ref": "r"}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), GRACE + 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert time.time() < ready["expires_at"] + GRACE
