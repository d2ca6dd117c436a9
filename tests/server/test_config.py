from __future__ import annotations

from pathlib import Path

import pytest

from server.app.config import ConfigError, Settings, load

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_config_lists_every_default() -> None:
    assert load(ROOT / "config.toml", {}) == Settings()
    text = (ROOT / "config.toml").read_text()
    for section in Settings.__struct_fields__:
        for key in getattr(Settings(), section).__struct_fields__:
            assert f"{key} =" in text or f"# {key} =" in text, f"[{section}] {key} undocumented"


def test_environment_overrides() -> None:
    env = {
        "PORT": "9001",
        "REDIS_URL": "redis://h:1/0",
        "OPENAI_API_KEY": "k",
        "PARLEY_LIMITS_MAX_TEXT_CHARS": "12",
        "PARLEY_SERVER_ALLOWED_ORIGINS": "https://a.example, https://b.example",
        "PARLEY_AUTH_DEV_LOGIN": "true",
    }
    s = load(ROOT / "config.toml", env)
    assert s.server.port == 9001 and s.redis.url == "redis://h:1/0"
    assert s.limits.max_text_chars == 12 and not s.simulated
    assert s.server.allowed_origins == ["https://a.example", "https://b.example"]
    assert s.auth.dev_login is True


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ("[limits]\nmax_text_chars = 'lots'\n", {}, "max_text_chars"),
        ("[limits]\nmax_txt_chars = 5\n", {}, "max_txt_chars"),
        ("[nonsense]\n", {}, "nonsense"),
        ("", {"PARLEY_LIMITS_NOPE": "1"}, "PARLEY_LIMITS_NOPE"),
        ("", {"PARLEY_BOGUS_KEY": "1"}, "PARLEY_BOGUS_KEY"),
        ("", {"PORT": "eighty"}, "port"),
        ("[llm]\nstall_timeout = 0\n", {}, "stall_timeout"),  # every reply would stall
        ("", {"PARLEY_LLM_FIRST_CHUNK_TIMEOUT": "0"}, "first_chunk_timeout"),
        ("[auth]\njwks_timeout = 0\n", {}, "jwks_timeout"),  # every key fetch would fail
        ("", {"PARLEY_HOOKS_TURN_TIMEOUT": "0"}, "turn_timeout"),  # every hook call would fail
        ('[llm]\nmodel = "sim\\u0000"\n', {}, "`model` holds a NUL"),
        ("", {"PARLEY_LLM_MODEL": "sim\udcff"}, "`model` holds a lone UTF-16 surrogate"),
        ("", {"PARLEY_SERVER_ALLOWED_ORIGINS": "a,b\x00"}, "`allowed_origins` holds a NUL"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(
    tmp_path: Path, toml: str, env: dict[str, str], named: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load(path, env)
    assert named in str(error.value)


def test_a_section_whose_name_starts_with_another_takes_its_own_variables() -> None:
    """PARLEY_SERVER_API_KEYS is [server_api] keys, not [server] api_keys."""
    s = load(ROOT / "config.toml", {"PARLEY_SERVER_API_KEYS": "k1, k2", "PARLEY_SERVER_PORT": "1"})
    assert s.server_api.keys == ["k1", "k2"] and s.server.port == 1
