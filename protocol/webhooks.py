"""Standard Webhooks signatures (https://www.standardwebhooks.com), pure.

A request carries `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`:
`v1,` and the base64 HMAC-SHA256 of `{id}.{timestamp}.{body}` under the secret, which is
written `whsec_` and its base64 bytes. The receiver recomputes it, compares in constant time
and refuses a timestamp too far from its clock (a replay).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Final

SECRET_PREFIX: Final = "whsec_"
VERSION: Final = "v1"
TOLERANCE: Final = 300
"""Seconds a receiver accepts between the timestamp and its own clock."""


class BadSecret(ValueError):
    """The secret is not `whsec_` followed by base64."""


def secret_bytes(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadSecret("the hook secret must be whsec_ followed by base64") from exc
    if not key:
        raise BadSecret("the hook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header's value for one request."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), signed, hashlib.sha256).digest()
    return f"{VERSION},{base64.b64encode(digest).decode()}"


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def verify(
    secret: str, msg_id: str, timestamp: str, signature: str, body: bytes, now: float
) -> bool:
    """True when one of the space-separated signatures is ours and the timestamp is fresh."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent) > TOLERANCE:
        return False
    expected = sign(secret, msg_id, sent, body)
    return any(hmac.compare_digest(expected, given) for given in signature.split())
