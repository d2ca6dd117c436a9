-- announce: append `queued {message_id, position}` to the conversation's events when the
-- turn still waits in the fair queue (it has an entry in `told`, from say or regenerate until
-- dispatch or unqueue) and its position is new to the tabs: never told, or changed and last
-- told at least a second ago (`now_ms`, the caller's clock), or changed to 0: the turn is
-- next, which its tabs learn at once however recently they heard of it (its `start` may
-- follow within the second). Returns the event's seq, or 0
-- when nothing was appended.
local told_key = KEYS[1]
local seq_key = KEYS[2]
local log_key = KEYS[3]
local channel = KEYS[4]
local persisted_key = KEYS[5]
local message_id = ARGV[1]
local position = ARGV[2]
local now_ms = tonumber(ARGV[3])
local frame = ARGV[4]
local maxlen = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])

local told = redis.call('HGET', told_key, message_id)
if not told then return 0 end
local told_position, told_ms = string.match(told, '^(%-?%d+):(%d+)$')
if told_position == position then return 0 end
if position ~= '0' and now_ms - tonumber(told_ms) < 1000 then return 0 end
redis.call('HSET', told_key, message_id, position .. ':' .. now_ms)
return append_event(seq_key, log_key, channel, persisted_key, frame, maxlen, ttl)
