-- start_generation and fair_start: how say, regenerate and enter hand an accepted turn on
-- (the loader puts this file after lib_now, and lib_turn_guards where used, in front of
-- them), with what they read of the fair queue and of the workers' slots.

-- The live workers' slots: the `worker.concurrency` each worker's heartbeat wrote in the
-- `slots` hash (`slots deadline_ms`), summed over those whose deadline has not passed.
local function fair_capacity(slots_key)
  local now = now_ms()
  local beats = redis.call('HGETALL', slots_key)
  local total = 0
  for i = 2, #beats, 2 do
    local slots, deadline = string.match(beats[i], '^(%d+) (%d+)$')
    if slots and tonumber(deadline) >= now then total = total + tonumber(slots) end
  end
  return total
end

-- The turns on the turns Stream's shards: the ones handed to the workers and not done.
local function fair_on_streams(streams)
  local total = 0
  for _, stream in ipairs(streams) do total = total + redis.call('XLEN', stream) end
  return total
end

-- Whether a worker slot is free: fewer turns on the Stream than the live workers' slots.
local function fair_slot_free(queue)
  return fair_on_streams(queue.streams) < fair_capacity(queue.slots_key)
end

-- Whether a turn must wait even with a slot free: others wait in the fair queue already, or
-- the user runs `per_user` generations (0: no cap).
local function fair_behind(queue)
  if redis.call('LLEN', queue.ring_key) > 0 then return true end
  local per_user = tonumber(queue.per_user)
  return per_user > 0 and tonumber(redis.call('GET', queue.running_key) or '0') >= per_user
end

-- Hand an accepted turn's job on: without the fair queue (`fair` not '1') straight onto the
-- turns Stream (shard); with it, onto the Stream too when a slot is free and the turn is behind
-- nobody (naming the user, whose running count the worker's `release` lowers): the common
-- case, decided here so that it costs no round trip more than with the queue off. Else at the
-- end of the user's fair queue (the user joining the ring when their queue was empty), marked
-- in `told` as waiting and not yet told its position, for server/redis/queue.py to hand over
-- in turn. Returns 1 when the turn waits, else 0.
local function fair_start(message_id, turns_key, job, queue)
  if queue.fair ~= '1' then
    redis.call('XADD', turns_key, '*', 'job', job)
    return 0
  end
  if fair_slot_free(queue) and not fair_behind(queue) then
    redis.call('INCR', queue.running_key)
    redis.call('XADD', turns_key, '*', 'job', job, 'user', queue.user)
    return 0
  end
  if redis.call('RPUSH', queue.key, job) == 1 then
    redis.call('RPUSH', queue.ring_key, queue.user)
  end
  redis.call('HSET', queue.told_key, message_id, '-1:0')
  return 1
end

-- Mark the conversation as generating and hand the job on (fair_start), in one script on one
-- Redis; in a cluster say_commit/regenerate_commit mark and enter.lua hands on.
local function start_generation(gen_key, message_id, lease, turns_key, job, queue)
  mark_generating(gen_key, message_id, lease)
  return fair_start(message_id, turns_key, job, queue)
end
