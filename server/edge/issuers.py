"""Identity providers whose tokens Parley accepts, resolved from settings (no I/O here).

Each configured issuer becomes an `Issuer`: where its keys are (a JWKS URL, or the OIDC
discovery document that names one), which `iss` and `aud` its tokens carry, which claim holds
the user id, and the provider's own rules (Supabase's `role`, Clerk's `azp`, Firebase's
`auth_time`). The presets only fill in URL shapes and defaults; an `issuer` or `jwks_url` set
in the settings always wins, so a test (or a self-hosted Supabase) can point them anywhere.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from server.app.config import ConfigError, IssuerSettings, Settings

ASYMMETRIC: Final = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
PROVIDERS: Final = frozenset({"supabase", "auth0", "clerk", "keycloak", "firebase"})
FIREBASE_JWKS: Final = (
    "https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com"
)
SUPABASE_REFUSED_ROLES: Final = frozenset({"service_role"})


class ClaimsRefused(Exception):
    """A token signed by its issuer whose claims the provider's rules refuse."""


@dataclass(frozen=True, slots=True)
class Issuer:
    provider: str
    issuer: str
    """The exact `iss` its tokens carry; empty for a bare `jwks_url` (then `iss` is not
    checked and the issuer serves tokens no other issuer claims)."""
    jwks_url: str
    """Empty when the key set's URL comes from OIDC discovery (`discovery_url`)."""
    audience: str
    user_claim: str
    authorized_parties: tuple[str, ...]
    allow_anonymous: bool

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    @property
    def name(self) -> str:
        return self.issuer or self.jwks_url

    def check(self, claims: Mapping[str, Any], now: float, leeway: float) -> None:
        """The provider's rules on a token whose signature, exp, nbf, iss and aud passed."""
        if self.provider == "supabase":
            role = claims.get("role")
            if not isinstance(role, str) or role in SUPABASE_REFUSED_ROLES:
                raise ClaimsRefused(f"Supabase role {role!r} may not open a socket")
            anonymous = role == "anon" or claims.get("is_anonymous") is True
            if anonymous and not self.allow_anonymous:
                raise ClaimsRefused("anonymous Supabase users are not allowed")
        azp = claims.get("azp")
        if self.authorized_parties and azp is not None and azp not in self.authorized_parties:
            raise ClaimsRefused("`azp` is not an authorized party")
        if self.provider == "firebase":
            auth_time = claims.get("auth_time")
            if not isinstance(auth_time, int | float) or auth_time > now + leeway:
                raise ClaimsRefused("`auth_time` must be a time in the past")


def resolve(settings: Settings) -> tuple[Issuer, ...]:
    """Every configured issuer: the top-level shorthand first, then `[[auth.issuers]]`."""
    auth = settings.auth
    configured = [s for s in (auth.shorthand(), *auth.issuers) if s is not None]
    issuers = tuple(_issuer(s, settings.server.allowed_origins) for s in configured)
    names = [i.name for i in issuers]
    if len(set(names)) != len(names):
        raise ConfigError("auth: two issuers with the same issuer / jwks_url")
    return issuers


def _issuer(s: IssuerSettings, allowed_origins: list[str]) -> Issuer:
    provider = s.provider.lower()
    if provider and provider not in PROVIDERS:
        raise ConfigError(f"auth.provider {s.provider!r}: one of {', '.join(sorted(PROVIDERS))}")
    issuer, jwks_url, audience = _preset(provider, s)
    if not issuer and not jwks_url:
        raise ConfigError(f"auth: provider {provider!r} needs `issuer` or `jwks_url`")
    for url in (issuer, jwks_url):
        if url:
            check_url(url, "auth")
    if provider == "auth0" and not audience:
        raise ConfigError("auth: Auth0 needs `audience` (the API identifier)")
    parties = s.authorized_parties or (allowed_origins if provider == "clerk" else [])
    return Issuer(
        provider=provider,
        issuer=issuer,
        jwks_url=jwks_url,
        audience=audience,
        user_claim=s.user_claim or "sub",
        authorized_parties=tuple(parties),
        allow_anonymous=s.allow_anonymous,
    )


def _preset(provider: str, s: IssuerSettings) -> tuple[str, str, str]:
    """(issuer, jwks_url, audience) from the preset, each overridden by what is set."""
    issuer, jwks, audience = "", "", ""
    if provider == "supabase":
        issuer = s.issuer or f"https://{_need(s.project, 'project', provider)}.supabase.co/auth/v1"
        jwks, audience = f"{issuer.rstrip('/')}/.well-known/jwks.json", "authenticated"
    elif provider == "auth0":
        issuer = s.issuer or f"https://{_need(s.domain, 'domain', provider)}/"
        jwks = f"{issuer.rstrip('/')}/.well-known/jwks.json"
    elif provider == "clerk":
        issuer = s.issuer or f"https://{_need(s.domain, 'domain', provider)}"
        jwks = f"{issuer.rstrip('/')}/.well-known/jwks.json"
    elif provider == "keycloak":
        issuer = s.issuer or _keycloak_issuer(s)
        jwks = f"{issuer.rstrip('/')}/protocol/openid-connect/certs"
    elif provider == "firebase":
        project = _need(s.project, "project", provider)
        issuer = s.issuer or f"https://securetoken.google.com/{project}"
        jwks, audience = FIREBASE_JWKS, project
    else:
        issuer = s.issuer
    return issuer, s.jwks_url or jwks, s.audience or audience


def _keycloak_issuer(s: IssuerSettings) -> str:
    host, realm = _need(s.domain, "domain", "keycloak"), _need(s.realm, "realm", "keycloak")
    return f"https://{host}/realms/{realm}"


def _need(value: str, key: str, provider: str) -> str:
    if not value:
        raise ConfigError(f"auth: provider {provider!r} needs `{key}`")
    return value


def check_url(url: str, what: str) -> None:
    """Keys come over HTTPS; plain HTTP only to this machine (a local provider, tests)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _loopback(parts.hostname):
        return
    raise ConfigError(f"{what}: {url!r} must be an https:// URL (http:// only to localhost)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
