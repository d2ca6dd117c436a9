"""Tools the model may call: the application's own HTTP tools and MCP servers' tools.

`definitions` (what a tool is, what a call gives back), `validation` (arguments against the
tool's JSON Schema), `http` (the application's tools, signed POSTs), `mcp` (MCP servers through
the official SDK), `toolbox` (every configured tool under one name each) and `runner` (one
model step's calls in parallel, each bounded in time and size, cancellable). docs/tools.md.
"""
