"""Parley's state in Redis: the key schema, the Lua scripts and the Python that runs them
(event log, turns, presence). The only place that speaks to Redis about conversations."""
