"""Token revocations and conversation presence against the real embedded Redis, through the
real `Verifier` (no Parley process)."""

from __future__ import annotations

import asyncio
import time
import uuid

import jwt
import pytest
from redis.asyncio import Redis

from server.app.config import AuthSettings
from server.edge.auth import AuthError, Verifier
from server.redis import keys
from server.redis.presence import Presence
from server.redis.revocations import LONGEST, Revocations
from server.redis.rooms import Present, Rooms, present
from tests.helpers.auth import SECRET, mint, new_user


def verifier(redis: Redis) -> Verifier:
    checker = Verifier(AuthSettings(), SECRET)
    checker.revocations = Revocations(redis, ttl=60)
    return checker


async def test_a_user_wide_revocation_refuses_older_tokens_once_forgotten(redis: Redis) -> None:
    checker = verifier(redis)
    user = new_user()
    old = mint(user)
    assert (await checker.verify(old)).user == user
    await Revocations(redis, ttl=60).revoke_before(user, time.time() + 1)
    assert (await checker.verify(old)).user == user  # cached: the disconnect must forget it
    checker.forget(user)
    with pytest.raises(AuthError, match="revoked"):
        await checker.verify(old)
    no_iat = jwt.encode({"sub": user, "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match="revoked"):
        await checker.verify(no_iat)
    later = mint(user, iat=int(time.time()) + 2)
    assert (await checker.verify(later)).user == user
    assert 0 < await redis.ttl(keys.revoked(user)) <= 60


@pytest.mark.parametrize(
    ("claims", "prefix"), [({"jti": "t1"}, "jti:"), ({"sid": "s1"}, "sid:"), ({}, "tok:")]
)
async def test_one_token_is_revoked_by_jti_sid_or_digest(
    redis: Redis, claims: dict[str, object], prefix: str
) -> None:
    checker = verifier(redis)
    user = new_user()
    token = mint(user, **claims)
    other = mint(user, ttl=1800)  # same user, another token
    principal = await checker.verify(token)
    assert principal.token_id.startswith(prefix)
    await Revocations(redis, ttl=60).revoke_token(user, principal.token_id, principal.expires_at)
    checker.forget(user)
    with pytest.raises(AuthError, match="revoked"):
        await checker.verify(token)
    assert (await checker.verify(other)).user == user


async def test_a_token_revoked_by_name_is_refused_until_it_expires(redis: Redis) -> None:
    """Its revocation outlives the TTL when the token does; a later user-wide revocation
    (TTL only) does not cut it short."""
    user = new_user()
    revocations = Revocations(redis, ttl=60)
    await revocations.revoke_token(user, "jti:long", time.time() + 7200)
    assert 7190 <= await redis.ttl(keys.revoked(user)) <= 7201
    await revocations.revoke_before(user, time.time())
    assert await redis.ttl(keys.revoked(user)) > 7000
    short = new_user()
    await revocations.revoke_token(short, "jti:short", time.time() + 5)
    assert 50 <= await redis.ttl(keys.revoked(short)) <= 60


async def test_revocations_at_once_never_leave_the_shorter_expiry(redis: Redis) -> None:
    """A user-wide revocation racing a token's longer one (another web process) cannot cut
    the token's short: the write and its expiry are one step."""
    revocations = Revocations(redis, ttl=60)
    for _ in range(20):
        user = new_user()
        await asyncio.gather(
            revocations.revoke_token(user, "jti:long", time.time() + 7200),
            revocations.revoke_before(user, time.time()),
            revocations.revoke_before(user, time.time()),
        )
        assert await redis.ttl(keys.revoked(user)) > 7000


async def test_a_token_claiming_to_live_for_ever_is_revoked_for_the_longest_kept(
    redis: Redis,
) -> None:
    user = new_user()
    await Revocations(redis, ttl=60).revoke_token(user, "jti:forever", 1e20)
    assert await redis.ttl(keys.revoked(user)) == LONGEST
    assert await redis.hget(keys.revoked(user), "jti:forever") == b"1"


async def test_presence_counts_live_processes_only(redis: Redis) -> None:
    conversation = uuid.uuid4()
    live, dead = Presence(redis, 10), Presence(redis, 10)
    await live.start()
    await dead.start()
    try:
        here = Rooms(redis, live.process, ttl=60)
        gone = Rooms(redis, dead.process, ttl=60)
        alice, bob = new_user(), new_user()
        for rooms, user in ((here, alice), (here, alice), (here, bob), (gone, bob)):
            rooms.joined(conversation, user)
        here.left(conversation, bob)
        await here.stop()
        await gone.stop()
        expected = sorted([Present(alice, 2), Present(bob, 1)], key=lambda p: p.user)
        assert await present(redis, conversation) == expected
        await dead.stop()  # its counts vanish with its place in the registry
        assert await present(redis, conversation) == [Present(alice, 2)]
    finally:
        await live.stop()
