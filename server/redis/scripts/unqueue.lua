-- unqueue: take a cancelled turn out of the user's fair queue and hand it to the workers at
-- once (past the capacity), where its cancel mark makes it end as `done {reason: cancelled}`
-- without calling the model, settling its budget and ledger as any cancelled turn does.
-- Returns 1, or 0 when the turn is not queued (running already, or finished).
local queue_key = KEYS[1]
local ring_key = KEYS[2]
local turns_key = KEYS[3]
local running_key = KEYS[4]
local told_key = KEYS[5]
local user = ARGV[1]
local message_id = ARGV[2]

for _, job in ipairs(redis.call('LRANGE', queue_key, 0, -1)) do
  if cjson.decode(job).message_id == message_id then
    redis.call('LREM', queue_key, 1, job)
    if redis.call('LLEN', queue_key) == 0 then redis.call('LREM', ring_key, 1, user) end
    redis.call('INCR', running_key)
    redis.call('XADD', turns_key, '*', 'job', job, 'user', user)
    redis.call('HDEL', told_key, message_id)
    return 1
  end
end
return 0
