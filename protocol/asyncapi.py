"""The AsyncAPI 3 document of the protocol, generated from the Structs in frames.py (each
frame's docstring is its message's description) and the close codes in session.py.

It is the reference form of the protocol: `docs/asyncapi.json` is this document (a test keeps
it in step) and a running Parley serves it at `GET /asyncapi.json`.
"""

from __future__ import annotations

import inspect
from typing import Any

import msgspec

from protocol import frames as f
from protocol.session import CLOSE_MEANINGS


def _tag(struct: type[msgspec.Struct]) -> str:
    return str(struct.__struct_config__.tag)


def _message(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """A frame's message: its docstring is the description, the first paragraph the summary."""
    description = inspect.cleandoc(struct.__doc__ or "")
    return {
        "name": _tag(struct),
        "title": struct.__name__,
        "summary": " ".join(description.split("\n\n")[0].split()),
        "description": description,
        "payload": {"$ref": f"#/components/schemas/{struct.__name__}"},
    }


def document() -> dict[str, Any]:
    (_, *_), components = msgspec.json.schema_components(
        [*f.CLIENT_FRAMES, *f.SERVER_FRAMES], ref_template="#/components/schemas/{name}"
    )
    messages = {_tag(s): _message(s) for s in (*f.CLIENT_FRAMES, *f.SERVER_FRAMES)}
    ref = "#/channels/socket/messages/{}"
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Parley WebSocket protocol",
            "version": str(f.PROTOCOL_VERSION),
            "description": (
                "JSON text frames over one WebSocket at GET /ws, subprotocol `parley.v1`. "
                "Authenticate with `Sec-WebSocket-Protocol: parley.v1, bearer.<JWT>` or a "
                "first `auth` frame. Conversation events carry `seq`, contiguous per "
                "conversation; a gap means rejoin with `after`. Close codes: "
                + "; ".join(f"{int(code)} {text}" for code, text in CLOSE_MEANINGS.items())
            ),
        },
        "channels": {
            "socket": {
                "address": "/ws",
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            }
        },
        "operations": {
            "sendFrame": {
                "action": "receive",
                "channel": {"$ref": "#/channels/socket"},
                "summary": "Frames a client sends.",
                "messages": [{"$ref": ref.format(_tag(s))} for s in f.CLIENT_FRAMES],
            },
            "receiveFrame": {
                "action": "send",
                "channel": {"$ref": "#/channels/socket"},
                "summary": "Frames the server sends.",
                "messages": [{"$ref": ref.format(_tag(s))} for s in f.SERVER_FRAMES],
            },
        },
        "components": {"schemas": components, "messages": messages},
    }


def render() -> str:
    return msgspec.json.format(msgspec.json.encode(document()), indent=2).decode() + "\n"
