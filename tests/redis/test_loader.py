"""The script loader: every `.lua` file is loaded by some module, and calls name inputs."""

from __future__ import annotations

import re
import uuid
from importlib import resources

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from server.redis import (
    approvals,
    budgets,
    eventlog,
    presence,
    queue,
    revocations,
    scripts,
    turns,
)

LOADED = [
    eventlog.APPEND,
    eventlog.APPEND_PIECE,
    eventlog.APPEND_PIECES,
    eventlog.SEQ_FLOOR,
    eventlog.READ,
    eventlog.LOAD,
    eventlog.MARK_PERSISTED,
    eventlog.SET_META,
    eventlog.CACHE_HISTORY,
    eventlog.JOIN,
    eventlog.BEGIN,
    turns.SAY,
    turns.REGENERATE,
    turns.FINISH,
    turns.TURN_CHECK,
    turns.TURN_BUDGET,
    turns.TURN_RATE,
    turns.SAY_COMMIT,
    turns.REGENERATE_COMMIT,
    turns.FINISH_COMMIT,
    turns.FINISH_BUDGET,
    turns.TURN_FATE,
    turns.BUDGET_RECONCILE,
    presence.ADMIT,
    presence.ADMIT_LIVE,
    presence.LIVE_PROCESSES,
    presence.LEAVE,
    presence.BEAT,
    approvals.OPEN,
    approvals.SETTLE,
    budgets.LOAD,
    budgets.WARN,
    queue.DISPATCH,
    queue.RELEASE,
    queue.UNQUEUE,
    queue.ANNOUNCE,
    queue.ENTER,
    queue.ANNOUNCE_TOLD,
    queue.QUEUED_EVENT,
    revocations.REVOKE,
]


def test_every_script_file_is_loaded() -> None:
    files = {
        entry.name.removesuffix(".lua")
        for entry in resources.files("server.redis.scripts").iterdir()
        if entry.name.endswith(".lua") and not entry.name.startswith("lib_")
    }
    assert files == {script.name for script in LOADED}


def test_a_call_is_turned_into_keys_and_args_in_the_declared_order() -> None:
    keys, args = eventlog.APPEND.positional(
        {
            "ttl": 9,
            "frame": b"{}",
            "persisted_key": "p",
            "channel": "c",
            "maxlen": 5,
            "log_key": "l",
            "seq_key": "s",
        }
    )
    assert keys == ["s", "l", "c", "p"] and args == [b"{}", 5, 9]


def test_the_rest_of_the_keys_and_args_follows_the_named_ones() -> None:
    keys, args = presence.LEAVE.positional(
        {"user_keys": ["a", "b"], "process": "p", "counts": [1, 2]}
    )
    assert keys == ["a", "b"] and args == ["p", 1, 2]


@pytest.mark.parametrize(
    "values",
    [
        {"seq_key": "s", "log_key": "l", "first_id": "1-0", "extra": 1},
        {"seq_key": "s", "first_id": "1-0"},
    ],
)
def test_a_call_must_name_every_input_exactly(values: dict[str, object]) -> None:
    with pytest.raises(scripts.ScriptError, match=r"read\.lua takes"):
        eventlog.READ.positional(values)


def test_library_functions_come_before_the_script() -> None:
    source = turns.SAY.source
    assert source.index("local function append_event") < source.index("local seq_key = KEYS[1]")
    assert source.index("local function turn_refused") < source.index("local seq_key = KEYS[1]")


PUBLISHING = {
    "append", "append_piece", "append_pieces", "say", "finish", "say_commit", "finish_commit",
    "open_approval", "settle_approval", "announce", "queued_event",
}  # fmt: skip


@pytest.mark.parametrize("script", LOADED, ids=lambda script: script.name)
def test_a_script_registered_with_a_cluster_publishes_only_on_sharded_channels(
    script: scripts.Script,
) -> None:
    """In a cluster a plain PUBLISH is copied to every node: `sharded` must catch every
    publish of every script, however the script (or a function it includes) spells it."""
    sharded = script.sharded().source
    assert not re.search(r"(?<!S)PUBLISH['\"]", sharded, re.IGNORECASE)
    assert ("redis.call('SPUBLISH', channel," in sharded) == (script.name in PUBLISHING)


@pytest.mark.parametrize("script", LOADED, ids=lambda script: script.name)
def test_the_bundle_gives_each_script_the_functions_it_calls(script: scripts.Script) -> None:
    """Redis runs every script inside the bundle, which finds each one's functions by
    itself: every library function the script (as loaded) calls must be among them."""
    found = scripts.libraries_of(scripts._read(script.name))
    texts = [scripts._read(name) for name in [script.name, *found]]
    code = re.sub(r"--.*$", "", "\n".join(texts), flags=re.MULTILINE)
    called = {
        library
        for library, functions in scripts._library_functions().items()
        for function in functions
        if re.search(rf"(?<!function )\b{function}\(", code)
    }
    assert called <= set(found)


def test_the_sharded_bundle_publishes_only_on_sharded_channels() -> None:
    bundle = scripts.bundle(sharded=True)
    assert not re.search(r"(?<!S)PUBLISH['\"]", bundle, re.IGNORECASE)
    assert "redis.call('PUBLISH'," in scripts.bundle()


async def test_a_call_runs_its_own_script_of_the_bundle(redis: Redis) -> None:
    """Every call is the one bundle, its script named last; KEYS and ARGV are its own."""
    key = f"parley:test:{uuid.uuid4()}"
    await redis.set(key, 7)
    raise_seq = eventlog.SEQ_FLOOR.register(redis)
    assert raise_seq.redis_script.script == scripts.bundle()
    assert await raise_seq(seq_key=key, floor=9) == 1
    assert int(await redis.get(key)) == 9
    assert await raise_seq(seq_key=key, floor=3) == 0
    with pytest.raises(ResponseError, match="no script named nothing"):
        await redis.evalsha(raise_seq.redis_script.sha, 0, "nothing")
