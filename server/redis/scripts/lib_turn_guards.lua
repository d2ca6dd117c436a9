-- turn_refused and start_generation: what say and regenerate share (the loader puts this
-- file in front of them).

-- Why a new turn may not start now, as the script's answer ({'unloaded'}, {'busy'}, the
-- budget's refusal, {'rate', seconds until the window ends}), or nil when it may. Counts the
-- turn against the user's per-minute rate. `over_budget` says why the budget refuses, if it
-- does (before the rate counts the turn).
local function turn_refused(meta_key, gen_key, rate_key, turn_limit, over_budget)
  if redis.call('EXISTS', meta_key) == 0 then return {'unloaded'} end
  if redis.call('EXISTS', gen_key) == 1 then return {'busy'} end
  local refused = over_budget()
  if refused then return refused end
  local n = redis.call('INCR', rate_key)
  if n == 1 then redis.call('EXPIRE', rate_key, 61) end
  if n > tonumber(turn_limit) then return {'rate', redis.call('TTL', rate_key)} end
  return nil
end

-- Mark the conversation as generating (the `gen` hash, alive for `lease` seconds unless the
-- worker's heartbeat renews it) and queue the job: with `fair` ('1') at the end of the
-- user's fair queue (the user joining the ring when their queue was empty), for
-- server/redis/queue.py to hand to the workers, marked as waiting and not yet told its
-- position in the queue's `told` hash; otherwise straight on the turns Stream.
local function start_generation(gen_key, message_id, lease, turns_key, job, queue)
  redis.call('HSET', gen_key, 'message_id', message_id, 'state', 'queued')
  redis.call('EXPIRE', gen_key, lease)
  if queue.fair ~= '1' then
    redis.call('XADD', turns_key, '*', 'job', job)
  else
    if redis.call('RPUSH', queue.key, job) == 1 then
      redis.call('RPUSH', queue.ring_key, queue.user)
    end
    redis.call('HSET', queue.told_key, message_id, '-1:0')
  end
end
