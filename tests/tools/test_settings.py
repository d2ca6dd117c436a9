"""The tools' settings as config.toml and the environment give them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.app.config import (
    ConfigError,
    HttpToolSettings,
    McpServerSettings,
    Settings,
    ToolsSettings,
    load,
)
from server.tools.definitions import known_tools, unknown_tools
from server.tools.toolbox import Toolbox

TOML = """
[llm]
max_steps = 3

[tools]
approval_timeout = 60.0

[[tools.http]]
name = "weather"
description = "The weather in a city"
url = "https://app.example/tools/weather"
approval = "always"
parameters = { type = "object", properties = { city = { type = "string" } }, required = ["city"] }

[[tools.mcp]]
name = "files"
url = "https://mcp.example/mcp"
headers = { x-user = "{user}" }
prefix = "files_"
approvals = { delete = "always" }

[[tools.mcp]]
name = "local"
command = ["python", "-m", "some_server"]
"""


def test_tools_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(TOML)
    settings = load(path, {})
    assert settings.llm.max_steps == 3
    tools = settings.tools
    assert tools.approval_timeout == 60.0 and tools.call_timeout == 30.0
    [weather] = tools.http
    assert (weather.name, weather.approval, weather.timeout) == ("weather", "always", None)
    assert weather.parameters["required"] == ["city"]
    files, local = tools.mcp
    assert files.headers == {"x-user": "{user}"} and files.approvals == {"delete": "always"}
    assert local.command == ["python", "-m", "some_server"] and local.url == ""


def test_defaults() -> None:
    settings = Settings()
    assert settings.llm.max_steps == 8
    assert settings.tools.approval_timeout == 600.0
    assert settings.tools.http == [] and settings.tools.mcp == []


def test_tools_from_the_environment() -> None:
    env = {
        "PARLEY_TOOLS_HTTP": '[{"name": "t", "url": "http://127.0.0.1:1/t"}]',
        "PARLEY_TOOLS_CALL_TIMEOUT": "5",
    }
    settings = load("/nonexistent.toml", env)
    assert settings.tools.http[0].name == "t" and settings.tools.call_timeout == 5.0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PARLEY_TOOLS_HTTP": '[{"name": "no spaces", "url": "x"}]'}, "name"),
        ({"PARLEY_TOOLS_HTTP": '[{"name": "t", "url": "x", "approval": "maybe"}]'}, "approval"),
        ({"PARLEY_TOOLS_HTTP": '[{"name": "t"}]'}, "url"),
        ({"PARLEY_LLM_MAX_STEPS": "0"}, "max_steps"),
        ({"PARLEY_TOOLS_MCP": '[{"name": "m", "headers": {"a": 1}}]'}, "headers"),
    ],
)
def test_bad_tool_settings_name_the_key(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load("/nonexistent.toml", env)


@pytest.mark.parametrize(
    "server",
    [
        McpServerSettings(name="neither"),
        McpServerSettings(name="both", url="http://127.0.0.1:1/mcp", command=["x"]),
    ],
)
def test_an_mcp_server_is_either_a_url_or_a_command(server: McpServerSettings) -> None:
    with pytest.raises(ConfigError, match=rf"tools\.mcp {server.name}: set either url or command"):
        Toolbox(ToolsSettings(mcp=[server]))


def test_without_mcp_servers_the_sdk_is_not_imported() -> None:
    """The SDK takes seconds to import: a process with HTTP tools only never loads it."""
    script = (
        "import sys\n"
        "from server.app.config import HttpToolSettings, ToolsSettings\n"
        "from server.tools.runner import Runner\n"
        "from server.tools.toolbox import Toolbox\n"
        "box = Toolbox(ToolsSettings(http=[HttpToolSettings(name='t', url='http://127.0.0.1:1/')]))\n"
        "Runner(box, 1, 1)\n"
        "print('mcp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_conversation_may_choose_http_tools_by_name_and_mcp_tools_by_prefix() -> None:
    tools = ToolsSettings(
        http=[HttpToolSettings(name="weather", url="http://127.0.0.1:1/w")],
        mcp=[McpServerSettings(name="files", url="http://127.0.0.1:1/mcp", prefix="files_")],
    )
    assert unknown_tools(tools, ["weather", "files_read", "files_", "clock", "file"]) == [
        "clock",
        "file",
    ]
    assert known_tools(tools) == ["weather", "files_*"]
    unprefixed = ToolsSettings(mcp=[McpServerSettings(name="any", command=["x"])])
    assert unknown_tools(unprefixed, ["whatever"]) == []  # its tools may have any name
    assert unknown_tools(ToolsSettings(), ["weather"]) == ["weather"]
