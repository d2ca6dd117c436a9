-- announce: append `queued {message_id, position}` to the conversation's events when the
-- turn's tabs are due to learn that position (told_due, lib_announce.lua). One Redis: `told`
-- and the conversation's keys in one script. Returns the event's seq, or 0 when nothing was
-- appended.
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

if not told_due(told_key, message_id, position, now_ms) then return 0 end
return append_event(seq_key, log_key, channel, persisted_key, frame, maxlen, ttl)
