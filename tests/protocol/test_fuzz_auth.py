"""Fuzz token verification: a JWT whose header or claims are arbitrary JSON (nested, huge,
not an object, numbers past any integer type) — even correctly signed, so pyjwt reads the
claims — is a Principal or an AuthError (4401 / 401), never anything else."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.frames import MAX_SEQ
from server.app.config import AuthSettings
from server.edge.auth import AuthError, Principal, Verifier
from tests.protocol.fuzzing import ANY_CHARACTER, HOSTILE_TEXT, JSON_VALUES, NUMBERS, to_json

SECRET = "fuzz-secret-0123456789abcdef0123456789abcdef"
VERIFIER = Verifier(AuthSettings(leeway=0), SECRET)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: str, claims: str) -> str:
    head = _b64(header.encode("utf-8", "surrogatepass")) + "."
    body = _b64(claims.encode("utf-8", "surrogatepass"))
    mac = hmac.new(SECRET.encode(), (head + body).encode(), hashlib.sha256).digest()
    return head + body + "." + _b64(mac)


CLAIM_VALUES = JSON_VALUES | NUMBERS | st.sampled_from([2**64, 10**30, 1e308, -1])
ANY_CLAIMS = st.dictionaries(
    st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "iss"]), CLAIM_VALUES, max_size=6
)
USER_CLAIMS = st.fixed_dictionaries(
    {"sub": st.just("alice")},
    optional={"exp": CLAIM_VALUES, "nbf": CLAIM_VALUES, "iat": CLAIM_VALUES},
)
CLAIMS = (ANY_CLAIMS | USER_CLAIMS).map(to_json)
HEADERS = st.just('{"alg":"HS256","typ":"JWT"}') | JSON_VALUES.map(to_json) | HOSTILE_TEXT
TOKENS = (
    st.builds(_signed, HEADERS, CLAIMS | HOSTILE_TEXT)
    | st.text(ANY_CHARACTER, max_size=300)
    | st.integers(1, 200_000).map(lambda n: "a" * n)
)


def verifies_or_refuses(token: str) -> None:
    try:
        principal = asyncio.run(VERIFIER.verify(token))
    except AuthError as exc:
        assert str(exc).startswith(("invalid token", "token expired"))
    else:
        assert isinstance(principal, Principal) and principal.user
        assert principal.expires_at is None or 0 <= principal.expires_at <= MAX_SEQ


@settings(max_examples=150, deadline=None)
@given(TOKENS)
def test_any_token_is_a_principal_or_an_auth_error(token: str) -> None:
    verifies_or_refuses(token)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60_000), st.booleans())
def test_nested_json_in_a_signed_token_is_refused(levels: int, in_header: bool) -> None:
    nested = "[" * levels + "]" * levels
    header, claims = '{"alg":"HS256"}', '{"sub":"a"}'
    if in_header:
        header = '{"alg":"HS256","x":' + nested + "}"
    else:
        claims = '{"sub":"a","x":' + nested + "}"
    verifies_or_refuses(_signed(header, claims))


@settings(max_examples=80, deadline=None)
@given(CLAIM_VALUES)
def test_any_expiry_is_refused_or_within_range(exp: object) -> None:
    verifies_or_refuses(_signed('{"alg":"HS256","typ":"JWT"}', to_json({"sub": "a", "exp": exp})))
