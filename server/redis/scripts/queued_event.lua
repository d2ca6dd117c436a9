-- queued_event: in a Redis Cluster, the conversation's half of announce.lua: append
-- `queued {message_id, position}` only while the conversation's generation is that turn's
-- and no worker has claimed it (the `gen` hash has no `worker` yet: server/redis/generations.py),
-- so a `queued` told after announce_told.lua decided can never follow the turn's `start`.
-- Returns the event's seq, or 0 when nothing was appended.
local gen_key = KEYS[1]
local seq_key = KEYS[2]
local log_key = KEYS[3]
local channel = KEYS[4]
local persisted_key = KEYS[5]
local message_id = ARGV[1]
local frame = ARGV[2]
local maxlen = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])

if redis.call('HGET', gen_key, 'message_id') ~= message_id then return 0 end
if redis.call('HEXISTS', gen_key, 'worker') == 1 then return 0 end
return append_event(seq_key, log_key, channel, persisted_key, frame, maxlen, ttl)
