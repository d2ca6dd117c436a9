"""From a queued turn to a finished, persisted reply: the worker that claims turns, the model
client that streams them, the persister that writes finished turns to PostgreSQL."""
