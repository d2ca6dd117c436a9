-- The tools the model is offered in a conversation, by name; NULL: every configured tool.
ALTER TABLE conversations ADD COLUMN tools text[];
