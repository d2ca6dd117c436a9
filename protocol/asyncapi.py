"""The AsyncAPI 3 document of the protocol, generated from the Structs in frames.py.

It is the reference form of the protocol: `docs/asyncapi.json` is this document (a test keeps
it in step) and a running Parley serves it at `GET /asyncapi.json`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import frames as f

CLIENT = (f.Auth, f.Create, f.Join, f.Leave, f.Say, f.Cancel, f.Regenerate, f.Ping)
SERVER = (
    f.Ready,
    f.Created,
    f.Joined,
    f.Ack,
    f.Pong,
    f.Error,
    f.Refresh,
    f.MessageEvent,
    f.Start,
    f.Token,
    f.Done,
    f.Queued,
    f.Updated,
    f.ConversationChanged,
)
CLOSE_CODES = {
    1000: "normal closure",
    1001: "server going away (shutdown): reconnect and rejoin with `after`",
    1009: "frame too large",
    1011: "internal error",
    1012: "service restart: reconnect and rejoin with `after`",
    1013: "try again later (overloaded, or the client reads too slowly)",
    4400: "protocol violation the session cannot continue after (repeated garbage)",
    4401: "missing, invalid or expired token (closed `auth.refresh_grace` after expiry)",
    4403: "Origin not allowed",
    4408: "no `auth` frame within `auth_timeout`",
    4429: "too many connections or frames for this user",
}


def _tag(struct: type[msgspec.Struct]) -> str:
    return str(struct.__struct_config__.tag)


def document() -> dict[str, Any]:
    (_, *_), components = msgspec.json.schema_components(
        [*CLIENT, *SERVER], ref_template="#/components/schemas/{name}"
    )
    messages = {
        _tag(s): {
            "name": _tag(s),
            "title": s.__name__,
            "summary": (s.__doc__ or "").strip().split("\n\n")[0] or None,
            "payload": {"$ref": f"#/components/schemas/{s.__name__}"},
        }
        for s in (*CLIENT, *SERVER)
    }
    for message in messages.values():
        if message["summary"] is None:
            del message["summary"]
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
                + "; ".join(f"{code} {text}" for code, text in CLOSE_CODES.items())
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
                "messages": [{"$ref": ref.format(_tag(s))} for s in CLIENT],
            },
            "receiveFrame": {
                "action": "send",
                "channel": {"$ref": "#/channels/socket"},
                "summary": "Frames the server sends.",
                "messages": [{"$ref": ref.format(_tag(s))} for s in SERVER],
            },
        },
        "components": {"schemas": components, "messages": messages},
    }


def render() -> str:
    return msgspec.json.format(msgspec.json.encode(document()), indent=2).decode() + "\n"
