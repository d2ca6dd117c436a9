"""`parley serve` as a newcomer runs it: embedded Redis and PostgreSQL, Ctrl-C, start again."""

from __future__ import annotations

import signal
from pathlib import Path

from protocol import frames as f
from server.dev.client import Client
from server.dev.embedded import free_port
from tests.helpers.auth import mint, new_user
from tests.helpers.conversations import say_and_finish, start_conversation
from tests.helpers.processes import Cluster, ParleyProcess


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            child = int(entry.name)
            found |= {child} | descendants(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_ctrl_c_leaves_nothing_behind_and_the_next_start_finds_the_conversation(
    cluster: Cluster, tmp_path: Path
) -> None:
    env = cluster.env(PARLEY_DATA_DIR=str(tmp_path / "data"))
    del env["REDIS_URL"], env["DATABASE_URL"]
    server = ParleyProcess("serve", env, free_port(), tmp_path / "s.log").start()
    children = descendants(server.pid)
    assert children, "embedded Redis and PostgreSQL run as children of parley serve"
    user = new_user()
    async with await Client.connect(server.ws_url, mint(user)) as client:
        conversation = await start_conversation(client, title="kept")
        await say_and_finish(client, conversation, "hello")
    assert server.stop(signal.SIGINT) == 0
    assert not [pid for pid in children if alive(pid)]
    assert (tmp_path / "data").is_dir()

    again = ParleyProcess("serve", env, server.port, tmp_path / "s2.log").start()
    try:
        async with await Client.connect(again.ws_url, mint(user)) as client:
            joined = await client.request(f.Join(conversation=conversation))
        assert joined.meta.title == "kept"
        assert [m.role for m in joined.history] == ["user", "assistant"]
    finally:
        again.stop(signal.SIGINT)
