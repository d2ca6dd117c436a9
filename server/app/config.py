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
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

from protocol import text
from protocol.frames import Limits as WireLimits
from protocol.jsondepth import too_deep


class ConfigError(Exception):
    pass


Port = Annotated[int, Meta(ge=0, le=65_535)]
Size = Annotated[int, Meta(ge=1, le=2**31 - 1)]
"""A count, a size in bytes or a limit: at least 1."""
Seconds = Annotated[float, Meta(ge=0, le=31_536_000)]
"""A duration from 0 to a year (a NaN or an infinity is refused)."""
Wait = Annotated[float, Meta(gt=0, le=31_536_000)]
"""A wait that something must end within: above 0 (at 0 every wait would end at once)."""
Rate = Annotated[float, Meta(ge=0, le=1e9)]


class _Section(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8000
    data_dir: str = ".parley"
    allowed_origins: list[str] = []
    trust_forwarded_proto: bool = False
    shutdown_grace: Seconds = 5.0
    drain_delay: Seconds = 1.0
    ws_ping_interval: Seconds = 20.0
    ws_ping_timeout: Seconds = 20.0
    sse_heartbeat: Seconds = 15.0
    sse_max_lifetime: Seconds = 300.0
    stream_ticket_ttl: Seconds = 30.0
    request_timeout: Seconds = 10.0
    keep_alive_timeout: Seconds = 5.0
    max_body_bytes: Size = 1_048_576
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"


class IssuerSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One identity provider whose tokens are verified with its published keys (JWKS).

    `provider` names a preset (supabase, auth0, clerk, keycloak, firebase) that derives the
    issuer and JWKS URL from `project` / `domain` / `realm`; `issuer` and `jwks_url` set
    explicitly win over the preset's. See docs/auth.md."""

    provider: str = ""
    issuer: str = ""
    jwks_url: str = ""
    audience: str = ""
    user_claim: str = "sub"
    project: str = ""
    domain: str = ""
    realm: str = ""
    authorized_parties: list[str] = []
    allow_anonymous: bool = False


class AuthSettings(IssuerSettings, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The local secret's settings and, inherited, the single-issuer shorthand: the
    top-level `provider`, `issuer`, `jwks_url`, `audience`... of `[auth]`."""

    jwt_secret: str = ""
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["HS256"])
    leeway: Seconds = 10.0
    auth_timeout: Seconds = 5.0
    allow_query_token: bool = False
    dev_login: bool | None = None
    issuers: list[IssuerSettings] = []
    jwks_cache_seconds: Seconds = 3600.0
    jwks_min_refresh: Seconds = 30.0
    jwks_timeout: Wait = 1.0
    refresh_hint: Seconds = 30.0
    refresh_grace: Seconds = 25.0

    def shorthand(self) -> IssuerSettings | None:
        """The top-level single-issuer settings as an issuer, when they name one: a
        `provider`, a `jwks_url`, or an `issuer` URL alone (its keys then come by OIDC
        discovery). `issuer` and `audience` bind the local secret's tokens too, as before."""
        discoverable = self.issuer.startswith(("https://", "http://"))
        if not (self.provider or self.jwks_url or discoverable):
            return None
        fields = {name: getattr(self, name) for name in IssuerSettings.__struct_fields__}
        return IssuerSettings(**fields)


class LimitsSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    max_frame_bytes: Size = 262_144
    max_text_chars: Size = 32_000
    max_joined: Size = 100
    frames_per_second: Rate = 50.0
    frame_burst: Size = 200
    bad_frames_before_close: Size = 20
    turns_per_minute: Size = 30
    max_connections_per_user: Size = 100
    outbox_bytes: Size = 1_048_576
    generations_per_user: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 2
    """A user's generations running at once (0: no cap); the rest wait in the fair queue."""
    fair_queue: bool = True
    """Turns wait in the fair queue (server/redis/queue.py) for a free worker slot; off,
    they go straight on the turns Stream, first come first served, with no cap per user.
    On a Redis Cluster too: there every turn goes to turns shard 0, the queue's slot."""

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
    pool_size: Size = 64
    log_max_events: Size = 2000
    ttl_seconds: Size = 604_800
    cluster: bool = False
    """`url` names any node of a Redis Cluster (server/redis/client.py): scripts stay on one
    slot, channels are sharded (SPUBLISH/SSUBSCRIBE) and the queues are split in shards."""
    queue_shards: Annotated[int, Meta(ge=0, le=1024)] = 0
    """How many streams the turns and persist queues are each split into (a conversation's
    turns always go to the same one); 0 picks 1 on a single Redis and 8 in a cluster."""

    conversation_slots: Annotated[int, Meta(ge=0, le=16384)] = 0
    """In a cluster: how many hash slots all conversations share (their keys' tag is the
    (ID mod N)-th of N tags whose slots are spread evenly over the slot space), so that the
    worker's appends of conversations on one slot go in one script call (docs/deploy.md,
    "Appends per shard"); 0: each conversation its own slot.
    Every process must say the same; changing it renames every conversation's Redis keys
    (conversations load again from PostgreSQL; generations running then are lost). Ignored
    on a single Redis."""

    persist_wait_ms: Annotated[int, Meta(ge=0, le=60_000)] = 500
    """How long the persister waits for the replicas of a persist stream's node to hold a
    batch of finished turns before writing it to PostgreSQL (`WAIT`, only where the node has
    replicas), so PostgreSQL is not ahead of a replica promoted after a failover; on timeout
    the batch is written all the same and counted. 0: no wait."""

    @property
    def shards(self) -> int:
        if self.queue_shards > 0:
            return self.queue_shards
        return 8 if self.cluster else 1


class DatabaseSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    url: str = ""
    pool_size: Size = 10


class LLMSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    base_url: str = ""
    api_key: str = ""
    model: str = "parley-sim"
    max_tokens: Size = 1024
    context_tokens: Size = 6000
    request_timeout: Seconds = 60.0
    first_chunk_timeout: Wait = 300.0
    """A reasoning model may think silently (no reasoning streamed) for minutes."""
    stall_timeout: Wait = 60.0
    """Between two chunks once the stream has begun; reasoning chunks count as progress."""
    max_duration: Seconds = 600.0
    max_steps: Annotated[int, Meta(ge=1, le=100)] = 8
    """Model calls per turn when the model calls tools: after this many, the turn ends."""
    think_tags: bool = False
    """Read `<think>…</think>` in the model's text as reasoning (models served without a
    reasoning parser); off by default, since a plain model may write the tags in its answer."""


class SimulatorSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How the simulated model (`server.dev.simulator`) behaves."""

    first_token_delay: Seconds = 0.3
    """Seconds before the first content token."""
    tokens_per_second: float = 30.0
    """Token rate; 0 or negative means as fast as possible."""
    max_tokens: Size = 200
    """Token cap when the request sets neither max_tokens nor max_completion_tokens."""


class WorkerSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    concurrency: Size = 64
    lease_seconds: Seconds = 10.0
    shutdown_deadline: Seconds = 25.0
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 0
    coalesce: bool = True
    """Join a generation's text chunks that arrive while its previous appends are on their
    way to Redis into one `token` event; false: one event per model chunk."""
    append_interval: Seconds = 0.004
    """At least this long between two batches of appends sent to Redis (one after a pause
    goes at once): under load a batch then carries more generations' events, and each
    generation's chunks have longer to join its queued event; an event waits at most this
    much longer. 0: a batch as soon as the previous one is answered."""


class MetricsSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    models: list[str] = []
    """Model names that may appear as a metric label (`llm.model` always may); others are
    `other`, so a client naming models cannot grow the number of series."""
    loop_lag_interval: Seconds = 0.1
    """Seconds between two samples of `parley_event_loop_lag_seconds` (how late the event
    loop runs a timer) in a process that serves /metrics; 0: not sampled."""


class ServerAPISettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The server API (`/api/server/`, docs/server-api.md): the host application's backend
    authenticates with one of `keys`, never with a user's token. No keys: the API is off."""

    keys: list[str] = []
    revocation_ttl: Seconds = 86_400.0
    """How long a user-wide revocation is kept: the longest token lifetime it covers. A token
    revoked by name (a session's disconnect) is refused until it expires, if that is later."""


class HooksSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """HTTP endpoints of the host application called around turns (docs/hooks.md); an
    empty URL turns its hook off."""

    connect_url: str = ""
    turn_url: str = ""
    finish_url: str = ""
    secret: str = ""
    """`whsec_` and base64: the Standard Webhooks signing key; empty sends no signature."""
    turn_timeout: Wait = 2.0
    turn_failure: Literal["allow", "refuse"] = "allow"
    finish_give_up: Seconds = 600.0
    """How long a `finish` call is retried while its endpoint fails before dead-lettering."""


Approval = Literal["never", "always"]
"""Whether a person must approve each call of a tool before it runs."""
ToolName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""What OpenAI-compatible models accept as a function name."""


class HttpToolSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One of the application's own tools: Parley POSTs the validated arguments to `url`,
    signed like the hooks (docs/tools.md)."""

    name: ToolName
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )
    """The JSON Schema of the arguments, as the model sees it and as calls are checked."""
    url: str
    approval: Approval = "never"
    timeout: Seconds | None = None
    """Seconds a call may take; `tools.call_timeout` when unset."""


class McpServerSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """An MCP server whose tools the model may call: streamable HTTP (`url`) or a local
    process over stdio (`command`, its arguments after it)."""

    name: str
    url: str = ""
    headers: dict[str, str] = {}
    """Sent with every request; `{user}` and `{conversation}` are replaced per call."""
    command: list[str] = []
    env: dict[str, str] = {}
    prefix: str = ""
    """Put in front of each of its tools' names as the model sees them (to keep them apart)."""
    approval: Approval = "never"
    approvals: dict[str, Approval] = {}
    """Per tool (its name on the server), overriding `approval`."""
    timeout: Seconds | None = None


class ToolsSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Tools the model may call (docs/tools.md); none configured: the model is offered none."""

    http: list[HttpToolSettings] = []
    mcp: list[McpServerSettings] = []
    secret: str = ""
    """`whsec_` and base64: signs the calls to HTTP tools; empty: `hooks.secret`."""
    call_timeout: Seconds = 30.0
    max_result_bytes: Size = 65_536
    """A result larger than this reaches the model as an error saying so."""
    approval_timeout: Seconds = 600.0
    """Seconds a call waits for a person's approval, then it counts as denied."""
    max_parallel: Size = 8
    """Calls of one model step running at once; the others wait their turn."""


Tokens = Annotated[int, Meta(ge=0, le=2**53)]
"""A token budget: 0 is unlimited."""
Price = Annotated[float, Meta(ge=0, le=1e6)]


class ModelPrice(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a model's tokens cost, per million."""

    input: Price = 0.0
    output: Price = 0.0


class BudgetsSettings(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Token budgets per user (protocol/budget.py), the models each group may pick and
    what their tokens cost."""

    window: Literal["day", "week", "month", "rolling24h"] = "day"
    default_tokens: Tokens = 0
    """The budget of a user whose group has none of its own; 0: unlimited."""
    group_claim: str = ""
    """The token claim naming the user's group (e.g. `plan`); empty: every user is in the
    default group."""
    groups: dict[str, Tokens] = {}
    warn_at: Annotated[float, Meta(ge=0, le=1)] = 0.8
    models: dict[str, list[str]] = {}
    """Group -> the models its users may pick; a group not listed may pick any."""
    prices: dict[str, ModelPrice] = {}
    """Model -> its price per million input and output tokens, for the ledger's cost."""

    @property
    def enabled(self) -> bool:
        """Whether any budget is configured (`ready` then carries the user's)."""
        return self.default_tokens > 0 or any(self.groups.values())

    def limit_for(self, group: str) -> int:
        return self.groups.get(group, self.default_tokens) if group else self.default_tokens

    def allows(self, group: str, model: str) -> bool:
        allowed = self.models.get(group)
        return allowed is None or model in allowed

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        price = self.prices.get(model)
        if price is None:
            return 0.0
        return (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000


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
    server_api: ServerAPISettings = ServerAPISettings()
    hooks: HooksSettings = HooksSettings()
    tools: ToolsSettings = ToolsSettings()
    budgets: BudgetsSettings = BudgetsSettings()

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
    raw = _read_toml(path)
    _overlay_environment(raw, environ)
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except (msgspec.ValidationError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    _check_storable(settings, path)
    return settings


def _check_storable(settings: Settings, path: Path) -> None:
    """Refuse a string setting that holds a NUL or a lone surrogate (an environment variable
    with bytes that are not UTF-8 decodes to those): the model name, for one, is stored."""
    for section in Settings.__struct_fields__:
        unstorable = text.unstorable_field(getattr(settings, section))
        if unstorable is not None:
            name, why = unstorable
            raise ConfigError(f"{path}: [{section}] {text.describe(name, why)}")


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # nesting or an integer past tomllib's limits
        raise ConfigError(f"{path}: not usable TOML: {exc or type(exc).__name__}") from None


def _overlay_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        target = ALIASES.get(name) or _parley_key(name)
        if target is None:
            continue
        section, key = target
        table = raw.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table to take {name}")
        table[key] = _env_value(section, key, value, name)


def _parley_key(name: str) -> tuple[str, str] | None:
    if not name.startswith("PARLEY_") or name in NOT_SETTINGS:
        return None
    # longest first: PARLEY_SERVER_API_KEYS is [server_api] keys, not [server] api_keys
    for section in sorted(Settings.__struct_fields__, key=len, reverse=True):
        head = f"PARLEY_{section.upper()}_"
        if name.startswith(head):
            return section, name[len(head) :].lower()
    raise ConfigError(f"environment variable {name}: no such setting section")


def _env_value(section: str, key: str, value: str, name: str) -> Any:
    """Lists come as JSON (`["a","b"]`) or comma-separated; scalars are converted later."""
    section_type = type(getattr(Settings(), section))
    if key not in section_type.__struct_fields__:
        raise ConfigError(f"environment variable {name}: unknown key `{key}` in [{section}]")
    default = getattr(section_type(), key)
    if isinstance(default, list):
        if value.startswith("["):
            return _json_list(value, name)
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(default, dict):
        return _json_table(value, name)
    return value


ENV_JSON_DEPTH: Final = 4


def _json_list(value: str, name: str) -> list[Any]:
    """An environment variable's JSON list: of strings, or of tables such as
    `PARLEY_AUTH_ISSUERS` (a few levels at most; the types are checked with the rest)."""
    problem = f"environment variable {name}: expected a JSON list"
    if too_deep(value, ENV_JSON_DEPTH):
        raise ConfigError(f"{problem}, got JSON nested more than {ENV_JSON_DEPTH} levels")
    try:
        items: list[Any] = msgspec.json.decode(value, type=list[Any])
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise ConfigError(f"{problem}: {exc}") from None
    return items


def _json_table(value: str, name: str) -> dict[str, Any]:
    """An environment variable's JSON object, such as `PARLEY_BUDGETS_GROUPS`."""
    problem = f"environment variable {name}: expected a JSON object"
    if too_deep(value, ENV_JSON_DEPTH):
        raise ConfigError(f"{problem}, got JSON nested more than {ENV_JSON_DEPTH} levels")
    try:
        table: dict[str, Any] = msgspec.json.decode(value, type=dict[str, Any])
    except (msgspec.DecodeError, UnicodeError) as exc:
        raise ConfigError(f"{problem}: {exc}") from None
    return table
