"""Development and test tools that ship with Parley: embedded Redis/PostgreSQL, the simulated
OpenAI-compatible model, a small asyncio client."""
