-- dispatch: hand the turns server/redis/queue.py picked (protocol/fairness.py) from their
-- users' fair queues to the workers' Stream, each only while the Stream holds fewer turns
-- than the workers' `capacity` and the user runs fewer than `per_user` (0: no cap), so a
-- pick made on a state another process changed meanwhile never overfills. A served user
-- moves to the end of the ring, or leaves it when their queue is empty. The Stream entry
-- names the user, whose running count the worker's `release` lowers. Returns the message
-- ids handed over.
-- Single Redis node: the ring, the Stream and every picked user's keys in one script.
local turns_key = KEYS[1]
local ring_key = KEYS[2]
local told_key = KEYS[3]
local user_keys = {unpack(KEYS, 4)} -- per pick: the user's queue, then their running count
local capacity = tonumber(ARGV[1])
local per_user = tonumber(ARGV[2])
local picks = {unpack(ARGV, 3)} -- the users, in the order served

local started = {}
for i, user in ipairs(picks) do
  if redis.call('XLEN', turns_key) >= capacity then break end
  local queue_key = user_keys[2 * i - 1]
  local running_key = user_keys[2 * i]
  local running = tonumber(redis.call('GET', running_key) or '0')
  if per_user == 0 or running < per_user then
    local job = redis.call('LPOP', queue_key)
    if job then
      redis.call('INCR', running_key)
      redis.call('XADD', turns_key, '*', 'job', job, 'user', user)
      local message_id = cjson.decode(job).message_id
      redis.call('HDEL', told_key, message_id)
      started[#started + 1] = message_id
    end
    redis.call('LREM', ring_key, 1, user)
    if redis.call('LLEN', queue_key) > 0 then redis.call('RPUSH', ring_key, user) end
  end
end
return started
