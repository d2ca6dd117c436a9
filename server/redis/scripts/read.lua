-- read: the conversation's last seq and the logged events from `first_id` on, in one step
-- (so nothing can be appended between the two). Returns {-1, {}} when the seq is not loaded.
local seq_key = KEYS[1]
local log_key = KEYS[2]
local first_id = ARGV[1]

local head = redis.call('GET', seq_key)
if not head then return {-1, {}} end
return {tonumber(head), redis.call('XRANGE', log_key, first_id, '+')}
