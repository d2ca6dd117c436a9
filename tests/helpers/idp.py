"""A local identity provider for the auth tests: real keys, a real HTTP server on 127.0.0.1.

`LocalIdP` serves a JWKS at any path ending in `/jwks.json`, `/certs` or `/jwk`, and an OIDC
discovery document at `<prefix>/.well-known/openid-configuration` naming `<prefix>` as the
issuer. It counts every request by path, and can be made slow, down (503), trickle its
body a byte at a time, or rotate its keys. `Signer` is a key pair the test made; `shaped`
builds claims the way each provider shapes its real tokens; `preset_issuers` points every
preset at a `LocalIdP`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from server.app.config import AuthSettings, IssuerSettings, ServerSettings, Settings
from server.edge.auth import Verifier
from server.edge.issuers import resolve


@dataclass
class Signer:
    """A private key, its `kid` and the algorithm it signs with."""

    kid: str
    alg: str
    private: Any

    @classmethod
    def rsa(cls, kid: str | None = None, alg: str = "RS256") -> Signer:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(kid or f"rsa-{uuid.uuid4().hex[:8]}", alg, key)

    @classmethod
    def ec(cls, kid: str | None = None, alg: str = "ES256") -> Signer:
        curve = ec.SECP384R1() if alg == "ES384" else ec.SECP256R1()
        return cls(kid or f"ec-{uuid.uuid4().hex[:8]}", alg, ec.generate_private_key(curve))

    @classmethod
    def ed25519(cls, kid: str | None = None) -> Signer:
        return cls(
            kid or f"ed-{uuid.uuid4().hex[:8]}", "EdDSA", ed25519.Ed25519PrivateKey.generate()
        )

    def jwk(self, with_alg: bool = True) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        jwk.update(kid=self.kid, use="sig")
        if with_alg:
            jwk["alg"] = self.alg
        return jwk

    def sign(self, claims: dict[str, Any], alg: str | None = None, **header: Any) -> str:
        headers = {"kid": self.kid, **header}
        return jwt.encode(claims, self.private, algorithm=alg or self.alg, headers=headers)


@dataclass
class LocalIdP:
    """An HTTP server on 127.0.0.1 publishing `signers`' public keys."""

    signers: list[Signer] = field(default_factory=list)
    delay: float = 0.0
    down: bool = False
    max_age: int | None = None
    trickle: float = 0.0
    """Seconds between the bytes of a body (0: all at once)."""
    publish_alg: bool = True
    """Whether each JWK names its `alg` (optional in a JWKS)."""
    raw: tuple[int, bytes] | None = None
    """A status and body to answer for the key set instead of the keys (a hostile server)."""
    hits: Counter[str] = field(default_factory=Counter)
    _server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalIdP:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                idp.hits[self.path] += 1
                if idp.delay:
                    time.sleep(idp.delay)
                if idp.down:
                    self._send(503, {"error": "down"})
                elif self.path.endswith("/.well-known/openid-configuration"):
                    prefix = self.path.removesuffix("/.well-known/openid-configuration")
                    issuer = idp.base + prefix
                    self._send(200, {"issuer": issuer, "jwks_uri": f"{issuer}/jwks.json"})
                elif idp.raw is not None:
                    self._send_raw(*idp.raw)
                elif self.path.endswith(("/jwks.json", "/certs", "/jwk")):
                    keys = [s.jwk(with_alg=idp.publish_alg) for s in idp.signers]
                    self._send(200, {"keys": keys})
                else:
                    self._send(404, {"error": "not found"})

            def _send(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    if idp.max_age is not None:
                        self.send_header("cache-control", f"public, max-age={idp.max_age}")
                    self.end_headers()
                    if idp.trickle:
                        self._trickle(data)
                    else:
                        self.wfile.write(data)
                except OSError:  # the client gave up (a timeout test)
                    pass

            def _send_raw(self, status: int, data: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-length", str(len(data)))
                    self.send_header("location", f"{idp.base}/elsewhere/jwks.json")
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client stopped reading (a body over its limit)
                    pass

            def _trickle(self, data: bytes) -> None:
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    time.sleep(idp.trickle)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def fetches(self, suffix: str = "") -> int:
        return sum(n for path, n in self.hits.items() if path.endswith(suffix))


def shaped(provider: str, issuer: str, user: str, ttl: float = 300, **extra: Any) -> dict[str, Any]:
    """Claims shaped like the provider's real tokens."""
    now = int(time.time())
    base: dict[str, Any] = {"iss": issuer, "iat": now, "exp": now + int(ttl)}
    if provider == "clerk":
        base |= {"sub": user, "azp": "http://localhost:3000", "sid": "sess_2abcDEF", "nbf": now}
        base |= {"v": 2, "fva": [0, -1]}
    elif provider == "supabase":
        base |= {
            "sub": user,
            "aud": "authenticated",
            "role": "authenticated",
            "email": f"{user}@example.com",
            "phone": "",
            "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": {},
            "aal": "aal1",
            "amr": [{"method": "password", "timestamp": now}],
            "session_id": str(uuid.uuid4()),
            "is_anonymous": False,
        }
    elif provider == "auth0":
        base |= {
            "sub": user,
            "aud": ["https://api.parley.test", f"{issuer}userinfo"],
            "azp": "Xk3Yc0mCl1ent1d",
            "scope": "openid profile email",
        }
    elif provider == "keycloak":
        base |= {
            "sub": user,
            "aud": "account",
            "typ": "Bearer",
            "azp": "parley-web",
            "jti": str(uuid.uuid4()),
            "session_state": str(uuid.uuid4()),
            "preferred_username": "ann",
            "realm_access": {"roles": ["offline_access", "default-roles-parley"]},
            "scope": "openid email profile",
        }
    elif provider == "firebase":
        project = issuer.rsplit("/", 1)[-1]
        base |= {
            "sub": user,
            "user_id": user,
            "aud": project,
            "auth_time": now - 60,
            "email": f"{user}@example.com",
            "email_verified": True,
            "firebase": {
                "identities": {"email": [f"{user}@example.com"]},
                "sign_in_provider": "password",
            },
        }
    else:
        base["sub"] = user
    return base | extra


SECRET = "s" * 40
"""The local secret (HS256) of the verifiers made here."""
ORIGIN = "http://localhost:3000"
PRESETS = ("clerk", "supabase", "auth0", "keycloak", "firebase")


def preset_issuers(base: str) -> list[IssuerSettings]:
    """Every preset pointed at the local IdP: only `issuer` overridden (and Firebase's
    fixed Google URL), so the JWKS URL shapes are the presets' own."""
    return [
        IssuerSettings(provider="clerk", issuer=f"{base}/clerk"),
        IssuerSettings(provider="supabase", issuer=f"{base}/sb/auth/v1"),
        IssuerSettings(
            provider="auth0", issuer=f"{base}/auth0/", audience="https://api.parley.test"
        ),
        IssuerSettings(provider="keycloak", issuer=f"{base}/realms/parley"),
        IssuerSettings(
            provider="firebase",
            project="proj",
            issuer=f"{base}/securetoken/proj",
            jwks_url=f"{base}/firebase/jwk",
        ),
        IssuerSettings(issuer=f"{base}/oidc"),
    ]


def issuer_url(base: str, provider: str) -> str:
    return {
        "clerk": f"{base}/clerk",
        "supabase": f"{base}/sb/auth/v1",
        "auth0": f"{base}/auth0/",
        "keycloak": f"{base}/realms/parley",
        "firebase": f"{base}/securetoken/proj",
        "oidc": f"{base}/oidc",
    }[provider]


def make_verifier(idp: LocalIdP, **auth: Any) -> Verifier:
    settings = Settings(
        server=ServerSettings(allowed_origins=[ORIGIN]),
        auth=AuthSettings(jwt_secret=SECRET, issuers=preset_issuers(idp.base), **auth),
    )
    return Verifier(settings.auth, SECRET, resolve(settings))


@contextlib.asynccontextmanager
async def preset_verifier(idp: LocalIdP, **auth: Any) -> AsyncIterator[Verifier]:
    verifier = make_verifier(idp, **auth)
    try:
        yield verifier
    finally:
        await verifier.close()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join(
        (part(json.dumps(header).encode()), part(json.dumps(claims).encode()), part(signature))
    )
