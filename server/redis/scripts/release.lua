-- release: a worker is done with a turn the fair queue counted as running (its entry names
-- the user): acknowledge and delete its Stream entry and lower the user's running count,
-- once (only the call that deleted the entry lowers it, or the one told the entry was
-- `buried`, which deleted it already). Returns the number of users waiting in the fair
-- queue's ring, so that the worker looks for a turn to hand over only when one waits.
local turns_key = KEYS[1]
local running_key = KEYS[2]
local ring_key = KEYS[3]
local group = ARGV[1]
local entry_id = ARGV[2]
local buried = ARGV[3]

redis.call('XACK', turns_key, group, entry_id)
local deleted = redis.call('XDEL', turns_key, entry_id)
if (deleted == 1 or buried == '1') and tonumber(redis.call('GET', running_key) or '0') > 0 then
  redis.call('DECR', running_key)
end
return redis.call('LLEN', ring_key)
