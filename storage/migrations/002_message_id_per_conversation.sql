-- A message id names a message within its conversation, not across all of them: a client
-- chooses its `say` ids, and one that happens to equal a message id of another conversation
-- (anybody's) must still be a new message here, never a conflict that drops it.
ALTER TABLE messages DROP CONSTRAINT messages_pkey;
ALTER TABLE messages ADD PRIMARY KEY (conversation_id, id);

-- Replaced replies are scoped the same way, and go with their conversation. Rows recorded
-- before this migration name no conversation (NULL) and still block their id everywhere.
ALTER TABLE replaced_messages DROP CONSTRAINT replaced_messages_pkey;
ALTER TABLE replaced_messages
    ADD COLUMN conversation_id uuid REFERENCES conversations (id) ON DELETE CASCADE;
CREATE UNIQUE INDEX replaced_messages_by_conversation ON replaced_messages (conversation_id, id);
CREATE INDEX replaced_messages_by_id ON replaced_messages (id) WHERE conversation_id IS NULL;
