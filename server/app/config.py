"""Settings: `config.toml` decoded into frozen msgspec Structs, then environment overrides.

Precedence, lowest first: the defaults below (mirrored, key for key, by the checked-in
`config.toml`), the TOML file, then the environment: `PORT`, `REDIS_URL`, `DATABASE_URL`,
`OPENAI_API_KEY`, `OPENAI_BASE_URL`, `PARLEY_JWT_SECRET`, `PARLEY_DATA_DIR`, and
`PARLEY_<SECTION>_<KEY>` for every other key. An unknown key or a wrong type stops start-up
with a `ConfigError` that names it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
from msgspec import Struct

from protocol.frames import Limits as WireLimits


class ConfigError(Exception):
    pass


class _Section(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: str = ".parley"
    allowed_origins: list[str] = []
    shutdown_grace: float = 5.0
    drain_delay: float = 1.0
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"


class AuthSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    jwt_secret: str = ""
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["HS256"])
    audience: str = ""
    issuer: str = ""
    leeway: float = 10.0
    auth_timeout: float = 5.0
    allow_query_token: bool = False
    dev_login: bool | None = None


class LimitsSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_frame_bytes: int = 262_144
    max_text_chars: int = 32_000
    max_joined: int = 100
    frames_per_second: float = 50.0
    frame_burst: int = 200
    bad_frames_before_close: int = 20
    turns_per_minute: int = 30
    max_connections_per_user: int = 100
    outbox_bytes: int = 1_048_576

    def wire(self) -> WireLimits:
        return WireLimits(
            max_frame_bytes=self.max_frame_bytes,
            max_text_chars=self.max_text_chars,
            max_joined=self.max_joined,
            frames_per_second=self.frames_per_second,
            turns_per_minute=self.turns_per_minute,
        )


class RedisSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = ""
    pool_size: int = 64
    log_max_events: int = 2000
    ttl_seconds: int = 604_800


class DatabaseSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = ""
    pool_size: int = 10


class LLMSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    base_url: str = ""
    api_key: str = ""
    model: str = "parley-sim"
    max_tokens: int = 1024
    context_tokens: int = 6000
    request_timeout: float = 60.0
    stall_timeout: float = 60.0
    max_duration: float = 600.0


class SimulatorSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    first_token_delay: float = 0.3
    tokens_per_second: float = 30.0
    max_tokens: int = 200


class WorkerSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    concurrency: int = 64
    lease_seconds: float = 10.0
    shutdown_deadline: float = 25.0
    metrics_port: int = 0


class MetricsSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models: list[str] = []
    """Model names that may appear as a metric label (`llm.model` always may); others are
    `other`, so a client naming models cannot grow the number of series."""


class Settings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitsSettings = LimitsSettings()
    redis: RedisSettings = RedisSettings()
    database: DatabaseSettings = DatabaseSettings()
    llm: LLMSettings = LLMSettings()
    simulator: SimulatorSettings = SimulatorSettings()
    worker: WorkerSettings = WorkerSettings()
    metrics: MetricsSettings = MetricsSettings()

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir)

    @property
    def simulated(self) -> bool:
        """True when no model endpoint is configured and Parley serves its own."""
        return not (self.llm.base_url or self.llm.api_key)

    @property
    def embedded(self) -> bool:
        return not (self.redis.url and self.database.url)


ALIASES: Final[Mapping[str, tuple[str, str]]] = {
    "PORT": ("server", "port"),
    "REDIS_URL": ("redis", "url"),
    "DATABASE_URL": ("database", "url"),
    "OPENAI_API_KEY": ("llm", "api_key"),
    "OPENAI_BASE_URL": ("llm", "base_url"),
    "PARLEY_JWT_SECRET": ("auth", "jwt_secret"),
    "PARLEY_DATA_DIR": ("server", "data_dir"),
}
NOT_SETTINGS: Final = frozenset({"PARLEY_CONFIG"})


def load(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if it exists) and the environment into Settings."""
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get("PARLEY_CONFIG") or "config.toml")
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    _overlay_environment(raw, environ)
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _overlay_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        target = ALIASES.get(name) or _parley_key(name)
        if target is None:
            continue
        section, key = target
        raw.setdefault(section, {})[key] = _env_value(section, key, value, name)


def _parley_key(name: str) -> tuple[str, str] | None:
    if not name.startswith("PARLEY_") or name in NOT_SETTINGS:
        return None
    for section in Settings.__struct_fields__:
        head = f"PARLEY_{section.upper()}_"
        if name.startswith(head):
            return section, name[len(head) :].lower()
    raise ConfigError(f"environment variable {name}: no such setting section")


def _env_value(section: str, key: str, value: str, name: str) -> Any:
    """Lists come as JSON (`["a","b"]`) or comma-separated; scalars are converted later."""
    section_type = type(getattr(Settings(), section))
    if key not in section_type.__struct_fields__:
        raise ConfigError(f"environment variable {name}: unknown key `{key}` in [{section}]")
    if isinstance(getattr(section_type(), key), list):
        if value.startswith("["):
            return msgspec.json.decode(value)
        return [item.strip() for item in value.split(",") if item.strip()]
    return value
