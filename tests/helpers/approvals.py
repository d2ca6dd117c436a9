"""Tools that need a person's approval, for the tests of approvals: a config file naming a
tool of the host application's (a real HTTP receiver on 127.0.0.1) with `approval =
"always"`, and the simulated model's control that calls it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from tests.helpers.receiver import SECRET, Receiver

TOOL = "delete_file"
PATH = "/delete"


def approval_config(directory: Path, receiver: Receiver, timeout: float = 600.0) -> Path:
    """config.toml with `delete_file` (approval: always) posting to the receiver, and calls
    waiting at most `timeout` seconds for an answer."""
    path = directory / f"approvals-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(
        f'[tools]\nsecret = "{SECRET}"\napproval_timeout = {timeout}\n\n'
        f'[[tools.http]]\nname = "{TOOL}"\ndescription = "Delete a file"\n'
        f'url = "{receiver.url(PATH)}"\napproval = "always"\n'
        'parameters = { type = "object", properties = { path = { type = "string" } }, '
        'required = ["path"] }\n'
    )
    return path


def answer_deleted(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    return 200, json.dumps({"deleted": body["arguments"]["path"]}).encode()


def delete_call(file: str) -> str:
    """The user text that makes the simulated model call `delete_file` on `file`."""
    return f"[sim:tool={TOOL} {json.dumps({'path': file})}] delete {file}"


def bad_delete_call() -> str:
    """The user text that makes the simulated model call `delete_file` with arguments that
    miss its schema (no `path`)."""
    return f'[sim:tool={TOOL} {{"file": 1}}] delete something'
