-- say_commit: in a Redis Cluster, the conversation's step of a say, after turn_check and
-- turn_rate (say.lua does it all on one Redis). Checks again what turn_check checked (another
-- tab may have started a turn since) and then, atomically on the conversation's slot,
-- remembers the say id, appends the user's `message` event and marks the conversation as
-- generating. The job is queued after it, on its turns shard, by server/redis/turns.py.
-- Returns {'ok', seq} or the refusal ({'late'}: the turn was declared void, turn_fate.lua).
local seq_key = KEYS[1]
local log_key = KEYS[2]
local channel = KEYS[3]
local persisted_key = KEYS[4]
local gen_key = KEYS[5]
local said_key = KEYS[6]
local recent_key = KEYS[7]
local meta_key = KEYS[8]
local fate_key = KEYS[9]
local frame = ARGV[1]
local message = ARGV[2]
local reply_id = ARGV[3]
local maxlen = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local lease = tonumber(ARGV[6])
local recent_kept = tonumber(ARGV[7])
local say_id = ARGV[8]
local meta_sha = ARGV[9]

local unproven = meta_unproven(meta_key, meta_sha)
if unproven then return unproven end
if redis.call('SISMEMBER', said_key, say_id) == 1 then return {'dup'} end
local blocked = turn_blocked(gen_key)
if blocked then return blocked end
if not turn_claimed(fate_key, ttl) then return {'late'} end
local conversation = {
  seq = seq_key, log = log_key, channel = channel, persisted = persisted_key,
  said = said_key, recent = recent_key, meta = meta_key,
}
local seq = keep_user_message(conversation, say_id, frame, message, maxlen, ttl, recent_kept)
mark_generating(gen_key, reply_id, lease)
return {'ok', seq}
