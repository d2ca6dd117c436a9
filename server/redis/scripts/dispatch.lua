-- dispatch: hand the turns server/redis/queue.py picked (protocol/fairness.py) from their
-- users' fair queues to the workers' Stream, each only while the Stream holds fewer turns
-- than the workers' `capacity` and the user runs fewer than `per_user` (0: no cap), so a
-- pick made on a state another process changed meanwhile never overfills. A served user
-- moves to the end of the ring, or leaves it when their queue is empty. The Stream entry
-- goes to the shard of the turn's conversation and
-- names the user, whose running count the worker's `release` lowers. Returns the message
-- ids handed over.
-- Single Redis node: the ring, the Stream's shards and every picked user's keys in one script.
local ring_key = KEYS[1]
local told_key = KEYS[2]
local rest = {unpack(KEYS, 3)} -- the turns Stream's `shards` shards, then per pick: the
                               -- user's queue and their running count
local capacity = tonumber(ARGV[1])
local per_user = tonumber(ARGV[2])
local shards = tonumber(ARGV[3])
local picks = {unpack(ARGV, 4)} -- the users, in the order served

-- The shard of a conversation's turns, as keys.shard_of computes it (the uuid's 128-bit
-- integer modulo `shards`), one hex digit at a time so that no number outgrows a double.
local function shard_of(conversation)
  local remainder = 0
  for digit in string.gmatch(conversation, '%x') do
    remainder = (remainder * 16 + tonumber(digit, 16)) % shards
  end
  return remainder
end

local function on_streams()
  local total = 0
  for shard = 1, shards do total = total + redis.call('XLEN', rest[shard]) end
  return total
end

local started = {}
for i, user in ipairs(picks) do
  if on_streams() >= capacity then break end
  local queue_key = rest[shards + 2 * i - 1]
  local running_key = rest[shards + 2 * i]
  local running = tonumber(redis.call('GET', running_key) or '0')
  if per_user == 0 or running < per_user then
    local job = redis.call('LPOP', queue_key)
    if job then
      local decoded = cjson.decode(job)
      redis.call('INCR', running_key)
      redis.call('XADD', rest[shard_of(decoded.conversation) + 1], '*', 'job', job, 'user', user)
      redis.call('HDEL', told_key, decoded.message_id)
      started[#started + 1] = decoded.message_id
    end
    redis.call('LREM', ring_key, 1, user)
    if redis.call('LLEN', queue_key) > 0 then redis.call('RPUSH', ring_key, user) end
  end
end
return started
