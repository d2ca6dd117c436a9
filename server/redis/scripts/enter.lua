-- enter: in a Redis Cluster, the fair queue's step of a say or regenerate, after the
-- conversation's commit (say_commit/regenerate_commit marked it as generating): the job goes
-- onto turns shard 0 when a slot is free and the turn is behind nobody, else into the user's
-- fair queue (fair_start, lib_fair_queue.lua, as say.lua does on one Redis). Every key is on
-- the fair queue's slot (keys.QUEUE_TAG, shard 0's), so capacity, the per-user cap and the
-- hand-over are decided in this one atomic step as on one Redis. A turn entered already
-- (the reply of a first try lost in a failover, then tried again) is not entered twice: the
-- `entered` mark remembers the first answer for `ttl` seconds. Returns 1 when the turn
-- waits, else 0.
local turns_key = KEYS[1] -- turns shard 0, where every turn of the fair queue goes
local queue_key = KEYS[2]
local ring_key = KEYS[3]
local told_key = KEYS[4]
local running_key = KEYS[5]
local slots_key = KEYS[6]
local entered_key = KEYS[7] -- the turn's mark: how it was entered
local job = ARGV[1]
local message_id = ARGV[2]
local user = ARGV[3]
local per_user = ARGV[4]
local ttl = tonumber(ARGV[5])

local before = redis.call('GET', entered_key)
if before then return tonumber(before) end
local waits = fair_start(message_id, turns_key, job,
  {fair = '1', key = queue_key, ring_key = ring_key, told_key = told_key, user = user,
   running_key = running_key, slots_key = slots_key, streams = {turns_key}, per_user = per_user})
redis.call('SET', entered_key, waits, 'EX', ttl)
return waits
