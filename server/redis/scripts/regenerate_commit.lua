-- regenerate_commit: in a Redis Cluster, the conversation's step of a regenerate, after
-- turn_check and turn_rate (regenerate.lua does it all on one Redis): checks again and marks
-- the conversation as generating. Returns {'ok', 0, replaced message id} or the refusal
-- ({'late'}: the turn was declared void, turn_fate.lua); the job is queued after it by
-- server/redis/turns.py.
local gen_key = KEYS[1]
local recent_key = KEYS[2]
local meta_key = KEYS[3]
local fate_key = KEYS[4]
local reply_id = ARGV[1]
local lease = tonumber(ARGV[2])
local fate_ttl = tonumber(ARGV[3])
local meta_sha = ARGV[4]

local unproven = meta_unproven(meta_key, meta_sha)
if unproven then return unproven end
local message = last_reply(recent_key)
if not message then return {'nothing'} end
local blocked = turn_blocked(gen_key)
if blocked then return blocked end
if not turn_claimed(fate_key, fate_ttl) then return {'late'} end
mark_generating(gen_key, reply_id, lease)
return {'ok', 0, message.id}
