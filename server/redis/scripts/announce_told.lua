-- announce_told: in a Redis Cluster, the fair queue's half of announce.lua: whether the turn's
-- tabs are due to learn `position` (told_due, lib_announce.lua), recorded as told when so.
-- The `queued` event is appended next, on the conversation's slot (queued_event.lua).
-- Returns 1 when due, else 0.
local told_key = KEYS[1]
local message_id = ARGV[1]
local position = ARGV[2]
local now_ms = tonumber(ARGV[3])

if told_due(told_key, message_id, position, now_ms) then return 1 end
return 0
