-- append: one event of a conversation, outside a generation (title changes, deletions...).
-- Returns its seq, or -1 (unloaded) when the conversation's seq is not in Redis: the caller
-- loads it from PostgreSQL and tries again, rather than restarting seq at 1.
local seq_key = KEYS[1]
local log_key = KEYS[2]
local channel = KEYS[3]
local persisted_key = KEYS[4]
local frame = ARGV[1]
local maxlen = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])

if redis.call('EXISTS', seq_key) == 0 then return -1 end
return append_event(seq_key, log_key, channel, persisted_key, frame, maxlen, ttl)
