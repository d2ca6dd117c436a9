-- The usage ledger: one row per finished turn, written in the turn's own transaction. It
-- names the conversation and message without a foreign key: a deleted conversation's
-- spending stays on record (billing, budgets).
CREATE TABLE usage (
    conversation_id   uuid NOT NULL,
    message_id        uuid NOT NULL,
    owner             text NOT NULL,
    model             text NOT NULL,
    status            text NOT NULL,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    reasoning_tokens  bigint NOT NULL DEFAULT 0,
    cached_tokens     bigint NOT NULL DEFAULT 0,
    -- true when the counts are Parley's estimate, not the model's report
    estimated         boolean NOT NULL DEFAULT false,
    cost              double precision NOT NULL DEFAULT 0,
    -- the budget bucket (Unix seconds, protocol/budget.py) the turn's tokens counted in
    bucket            bigint NOT NULL,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL,
    PRIMARY KEY (conversation_id, message_id)
);
CREATE INDEX usage_by_owner ON usage (owner, finished_at);
CREATE INDEX usage_by_owner_bucket ON usage (owner, bucket);

-- Budgets set per user through the server API, over their group's.
CREATE TABLE budget_overrides (
    owner      text PRIMARY KEY,
    tokens     bigint NOT NULL CHECK (tokens >= 0),
    updated_at timestamptz NOT NULL
);
