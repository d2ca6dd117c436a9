"""Parley's Lua scripts, one `.lua` file each, and the one way Python calls them.

A script names its inputs at the top, one `local` per key and argument, in order:

    local seq_key = KEYS[1]
    local frame = ARGV[1]
    local maxlen = tonumber(ARGV[2])
    local user_keys = {unpack(KEYS, 2)}    -- the rest, for a variable number of keys

and uses only those names below them. `load` reads the file, checks that rule and learns the
names; Python then calls the script with those names as keywords
(`append(seq_key=..., frame=...)`), and the call is turned into the positional KEYS and ARGV
Redis wants. Every key a script touches is one of its KEYS: none is built inside Lua.

Functions shared by several scripts live in `lib_*.lua` files, which `load` puts in front of
the script (`functions=`); they take everything as parameters and never read KEYS or ARGV.

Registered with a Redis Cluster client, a script publishes with `SPUBLISH` instead of
`PUBLISH` (`Script.sharded`): in a cluster a plain PUBLISH is copied to every node, a sharded
one stays on the node that owns the channel's slot, where its subscribers are.

Redis knows them as ONE script, the bundle of every script file (`bundle`): each
call passes its script's name as its last argument and the bundle runs that script's
source. A Redis node therefore knows all of a process's scripts or none of them. Redis
forgets scripts (a restart, a replica promoted, `SCRIPT FLUSH`, a new node given a slot), and
a batch's calls that meet a node that does not know theirs are loaded and run again after
the batch's other calls: with separate scripts a node knowing one call's script and not an
earlier one's (another process had loaded only the one) would then run a conversation's
calls out of order. With the bundle every call of a batch to that node fails alike, and they
run again in their order (`pipelined`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from server.redis.client import MOVING, HeldConnection, Packed, is_cluster

_NAMED: Final = re.compile(
    r"^local (\w+) = (?:tonumber\()?(KEYS|ARGV)\[(\d+)\]\)?\s*(?:--.*)?$", re.MULTILINE
)
_REST: Final = re.compile(
    r"^local (\w+) = \{unpack\((KEYS|ARGV), (\d+)\)\}\s*(?:--.*)?$", re.MULTILINE
)
_ANY_INPUT: Final = re.compile(r"\b(?:KEYS|ARGV)\b")
_COMMENT: Final = re.compile(r"--.*$", re.MULTILINE)
_PUBLISH: Final = "redis.call('PUBLISH',"
_SPUBLISH: Final = "redis.call('SPUBLISH',"
_FIRST: Final = ("append_pieces", "append_piece", "append")
"""The bundle's first branches: the calls a worker makes per token (each call compares the
name with the branches' in turn, a pointer comparison each)."""


class ScriptError(Exception):
    """A script file breaks the naming rule, or a call does not match its names."""


@dataclass(frozen=True, slots=True)
class Inputs:
    """The names a script gives its KEYS or its ARGV, and the name of the rest, if any."""

    names: tuple[str, ...]
    rest: str | None

    def values(self, given: Mapping[str, Any]) -> list[Any]:
        values = [given[name] for name in self.names]
        if self.rest is not None:
            values.extend(given[self.rest])
        return values


@dataclass(frozen=True, slots=True)
class Script:
    """A script's source (functions included) and the names of its KEYS and ARGV."""

    name: str
    source: str
    keys: Inputs
    args: Inputs
    _all: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = [*self.keys.names, *self.args.names, self.keys.rest, self.args.rest]
        object.__setattr__(self, "_all", frozenset(n for n in names if n is not None))

    def positional(self, values: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
        """KEYS and ARGV for a call that names every input once."""
        if len(values) != len(self._all) or not self._all.issuperset(values):
            raise ScriptError(
                f"{self.name}.lua takes {sorted(self._all)}, was given {sorted(values)}"
            )
        return self.keys.values(values), self.args.values(values)

    def register(self, redis: Redis) -> Registered:
        """This script as called through `redis`: by name, inside the bundle."""
        sharded = is_cluster(redis)
        script = self.sharded() if sharded else self
        return Registered(script, redis.register_script(bundle(sharded)))

    def sharded(self) -> Script:
        """The same script publishing on sharded channels (`SPUBLISH`), for a cluster."""
        return Script(self.name, self.source.replace(_PUBLISH, _SPUBLISH), self.keys, self.args)


@dataclass(frozen=True, slots=True)
class Call:
    """One call of a script, its inputs in place; run now or queued on a pipeline."""

    script: AsyncScript
    keys: list[Any]
    args: list[Any]
    packed: Packed | None = None
    """The whole EVALSHA command, packed by its maker (`keys` and `args` then empty): for a
    client that `packs_as_given` only."""

    def command(self) -> tuple[Any, ...]:
        """The call as `execute_command`'s arguments."""
        if self.packed is not None:
            return ("EVALSHA", self.packed)  # the name for redis-py, the bytes for the wire
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    async def run(self, client: Redis | Pipeline | None = None) -> Any:
        if isinstance(client, (Pipeline, ClusterPipeline)):
            # queued as the bare command: through redis-py's script object a pipeline would
            # first ask Redis `SCRIPT EXISTS` (one more round trip for every batch), and a
            # cluster pipeline refuses `evalsha` by name (queued as such it goes to the node of
            # its keys' slot); `pipelined` loads a script Redis does not know and runs it again
            return client.execute_command(*self.command())
        assert self.packed is None  # (sent only by `pipelined`)
        return await self.script(keys=self.keys, args=self.args, client=client)


@dataclass(frozen=True, slots=True)
class Registered:
    """A script registered with a client (EVALSHA, loading it again if Redis forgot it)."""

    script: Script
    redis_script: AsyncScript

    def bind(self, **values: Any) -> Call:
        keys, args = self.script.positional(values)
        args.append(self.script.name)  # which of the bundle's scripts (read off the end)
        return Call(self.redis_script, keys, args)

    async def __call__(self, **values: Any) -> Any:
        return await self.bind(**values).run()


async def run_all(redis: Any, calls: Sequence[Call]) -> list[Any]:
    """`pipelined`, raising the first error."""
    results = await pipelined(redis, calls)
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


async def pipelined(
    redis: Any, calls: Sequence[Call], held: HeldConnection | None = None
) -> list[Any]:
    """Run calls in one pipeline (not a transaction: on a cluster it spans nodes) and give
    their results or errors. The calls a node refused for not knowing the bundle (a cluster
    pipeline loads none; a node may have forgotten it) are run again, in their order, once
    it is loaded: none of that node's calls ran, since they are all the bundle's (a
    process's calls naming another bundle are not in the same batch). Sent on `held` (a
    single Redis's connection of the caller's own) unless another call is using it."""
    results = await _pipelined(redis, calls, held)
    raise_if_unreachable(redis, results)
    unknown = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if unknown:
        for source in {calls[i].script.script for i in unknown}:
            await redis.script_load(source)
        again = await _pipelined(redis, [calls[i] for i in unknown], held)
        raise_if_unreachable(redis, again)
        for i, result in zip(unknown, again, strict=True):
            results[i] = result
    return results


_UNREACHABLE: Final = (RedisConnectionError, RedisTimeoutError, *MOVING)
"""Results that mean "not now, not here": connection failures, or a slot moving
(`client.MOVING`)."""


def raise_if_unreachable(redis: Any, results: list[Any]) -> None:
    """A cluster pipeline hands back a node's connection failure, or a redirection it did
    not follow, as each call's result and keeps its slot table: raise it (every caller
    retries what it sends, idempotently), and have the client read the slot table again
    first (a failover or a migration may have moved the slots)."""
    failed = next((r for r in results if isinstance(r, _UNREACHABLE)), None)
    if failed is None:
        return
    if is_cluster(redis):
        redis._initialize = True  # what redis-py's own retry does: re-read the slots
    raise failed


async def _pipelined(redis: Any, calls: Sequence[Call], held: HeldConnection | None) -> list[Any]:
    if held is not None and not held.busy:
        return await held.run([call.command() for call in calls])
    if len(calls) == 1 and not is_cluster(redis):
        return [await _alone(redis, calls[0])]
    async with redis.pipeline(transaction=False) as pipe:
        for call in calls:
            await call.run(pipe)
        return list(await pipe.execute(raise_on_error=False))


async def _alone(redis: Any, call: Call) -> Any:
    """A single call sent as a plain command, its error reply given as `pipelined` gives it:
    redis-py's pipeline object cost a worker more than the call it carried (a worker's
    batch is, as a rule, one `append_pieces` call). Connection errors raise, as there."""
    try:
        return await redis.execute_command(*call.command())
    except ResponseError as exc:  # NoScriptError among them
        return exc


def load(name: str, *, functions: Sequence[str] = ()) -> Script:
    """The script `name.lua`, after the `lib_*.lua` files named in `functions` (the bundle
    finds them by itself, `libraries_of`)."""
    body = _read(name)
    keys, args = _inputs(name, body, "KEYS"), _inputs(name, body, "ARGV")
    declared = len(keys.names) + len(args.names) + (keys.rest is not None) + (args.rest is not None)
    if len(_ANY_INPUT.findall(_COMMENT.sub("", body))) != declared:
        raise ScriptError(f"{name}.lua reads KEYS or ARGV outside its named locals")
    libraries = [_read(library) for library in functions]
    for library, source in zip(functions, libraries, strict=True):
        if _ANY_INPUT.search(_COMMENT.sub("", source)):
            raise ScriptError(f"{library}.lua is a function library: it must not read KEYS/ARGV")
    return Script(name, "\n".join([*libraries, body]), keys, args)


def bundle(sharded: bool = False) -> str:
    """One script holding every `.lua` script of this package (publishing with `SPUBLISH`
    when `sharded`, as `Script.sharded`), each after the `lib_*.lua` files whose functions it
    calls (`libraries_of`): it takes the name of the script to run as its last argument,
    removes it and runs that script, whose KEYS and ARGV are then its own. Only that
    script's functions are made on a call, as when it was a script of its own. The same
    for every process of a version of Parley, whatever it imported."""
    names = sorted(
        entry.name.removesuffix(".lua")
        for entry in resources.files(__package__).iterdir()
        if entry.name.endswith(".lua") and not entry.name.startswith("lib_")
    )
    return _bundle(tuple(names), sharded)


@functools.cache
def _bundle(names: tuple[str, ...], sharded: bool) -> str:
    ordered = [*(n for n in _FIRST if n in names), *(n for n in names if n not in _FIRST)]
    branches = []
    for i, name in enumerate(ordered):
        body = _read(name)
        source = "\n".join([*(_read(lib) for lib in libraries_of(body)), body])
        if sharded:
            source = source.replace(_PUBLISH, _SPUBLISH)
        branches.append(f"{'if' if i == 0 else 'elseif'} parley_script == '{name}' then\n")
        branches.append(f"{source}\n")
    return "".join(
        [
            "local parley_script = ARGV[#ARGV]\n",
            "ARGV[#ARGV] = nil\n",
            *branches,
            "else\n",
            "  return redis.error_reply('no script named ' .. tostring(parley_script))\n",
            "end\n",
        ]
    )


_DEFINED: Final = re.compile(r"^local function (\w+)\(", re.MULTILINE)


def libraries_of(source: str) -> list[str]:
    """The `lib_*.lua` files whose functions `source` calls, and theirs, each after the ones
    it calls."""
    defined = _library_functions()
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(text: str) -> None:
        code = _COMMENT.sub("", text)
        for library, functions in defined.items():
            if library in visiting or library in ordered:
                continue
            if any(re.search(rf"\b{function}\(", code) for function in functions):
                visiting.add(library)
                visit(_read(library))
                ordered.append(library)

    visit(source)
    return ordered


@functools.cache
def _library_functions() -> dict[str, tuple[str, ...]]:
    """Each `lib_*.lua` file, by name, and the functions it defines."""
    libraries = sorted(
        entry.name.removesuffix(".lua")
        for entry in resources.files(__package__).iterdir()
        if entry.name.startswith("lib_") and entry.name.endswith(".lua")
    )
    return {library: tuple(_DEFINED.findall(_read(library))) for library in libraries}


def _read(name: str) -> str:
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def _inputs(name: str, body: str, table: str) -> Inputs:
    named = sorted(
        (int(index), local) for local, kind, index in _NAMED.findall(body) if kind == table
    )
    if [index for index, _ in named] != list(range(1, len(named) + 1)):
        raise ScriptError(f"{name}.lua must name {table}[1], {table}[2]... in order")
    rests = [(int(index), local) for local, kind, index in _REST.findall(body) if kind == table]
    if len(rests) > 1 or (rests and rests[0][0] != len(named) + 1):
        raise ScriptError(f"{name}.lua: the rest of {table} must start after its named ones")
    return Inputs(tuple(local for _, local in named), rests[0][1] if rests else None)
