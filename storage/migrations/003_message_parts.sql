-- An assistant message's parts (reasoning, text, and later tool calls) in order, when it has
-- more than its text; `content` stays the text alone, which is what later prompts are built
-- from. `reason` is how the reply ended when that was not `stop` (length, content_filter,
-- tool_calls, cancelled, error). Token usage stays in `usage` (jsonb), now with reasoning and
-- cached-prompt tokens, timing and `estimated`.
ALTER TABLE messages ADD COLUMN parts jsonb;
ALTER TABLE messages ADD COLUMN reason text;
