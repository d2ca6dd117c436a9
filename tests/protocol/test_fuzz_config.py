"""Fuzz configuration loading: any config.toml and any environment give Settings or a
ConfigError that says what is wrong, never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.app.config import ConfigError, Settings, load
from tests.protocol.fuzzing import ANY_CHARACTER, HOSTILE_TEXT, NUMBERS

KEYS = [
    (section, key)
    for section in Settings.__struct_fields__
    for key in type(getattr(Settings(), section)).__struct_fields__
]
KEY = st.sampled_from(KEYS)
VALUES = (
    NUMBERS.map(str)
    | st.sampled_from(["nan", "inf", "-1", "1" + "0" * 5000, "[" * 5000, '["a", ["b"]]', "[1,"])
    | st.text(ANY_CHARACTER, max_size=30)
)
TOML_DOCS = (
    HOSTILE_TEXT
    | st.builds(lambda k, v: f"[{k[0]}]\n{k[1]} = {v}\n", KEY, VALUES)
    | st.integers(1, 50_000).map(lambda n: "a = " + "[" * n + "]" * n)
    | st.integers(1, 50_000).map(lambda n: "a = " + "{b = " * n + "1" + "}" * n)
    | st.sampled_from(["server = 5\n", "[server]\nport = 99999999999999999999999\n"])
)


def loads_or_explains(document: str | None, environ: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.toml"
        if document is not None:
            path.write_bytes(document.encode("utf-8", "surrogatepass"))
        try:
            loaded = load(path, environ)
        except ConfigError as exc:
            assert str(exc)
        else:
            assert isinstance(loaded, Settings)


@settings(max_examples=150, deadline=None)
@given(TOML_DOCS)
def test_any_config_file(document: str) -> None:
    loads_or_explains(document, {})


@settings(max_examples=150, deadline=None)
@given(KEY, VALUES, st.sampled_from([None, "server = 5\n", "[llm]\nmodel = 'x'\n"]))
def test_any_environment_value(key: tuple[str, str], value: str, document: str | None) -> None:
    if "\x00" in value:
        return  # the operating system cannot hold NUL in an environment variable
    loads_or_explains(document, {f"PARLEY_{key[0].upper()}_{key[1].upper()}": value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "70000"),
        ("PARLEY_LIMITS_MAX_JOINED", "0"),
        ("PARLEY_WORKER_LEASE_SECONDS", "nan"),
        ("PARLEY_LLM_STALL_TIMEOUT", "-1"),
        ("PARLEY_SERVER_ALLOWED_ORIGINS", "[" * 5000),
        ("PARLEY_SERVER_ALLOWED_ORIGINS", '["a", '),
    ],
)
def test_out_of_range_values_name_the_key(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        load("/nonexistent/config.toml", {name: value})
    key = name.removeprefix("PARLEY_").split("_", 1)[-1].lower()
    assert key in str(error.value).lower() or name in str(error.value)
