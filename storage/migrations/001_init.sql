CREATE TABLE conversations (
    id          uuid PRIMARY KEY,
    owner       text NOT NULL,
    title       text NOT NULL DEFAULT '',
    system      text NOT NULL DEFAULT '',
    model       text NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    -- the persisted transcript covers every event up to history_seq
    history_seq bigint NOT NULL DEFAULT 0,
    -- the highest seq known to have been assigned (seeds Redis when its state is gone)
    last_seq    bigint NOT NULL DEFAULT 0
);
CREATE INDEX conversations_by_owner ON conversations (owner, updated_at DESC);

CREATE TABLE messages (
    id              uuid PRIMARY KEY,
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role            text NOT NULL CHECK (role IN ('user', 'assistant')),
    content         text NOT NULL,
    status          text NOT NULL CHECK (status IN ('complete', 'cancelled', 'error')),
    model           text,
    usage           jsonb,
    seq             bigint NOT NULL,
    created_at      timestamptz NOT NULL
);
CREATE INDEX messages_by_conversation ON messages (conversation_id, seq);

-- assistant messages a `regenerate` replaced: never (re)inserted, whatever order turns arrive in
CREATE TABLE replaced_messages (
    id uuid PRIMARY KEY
);
