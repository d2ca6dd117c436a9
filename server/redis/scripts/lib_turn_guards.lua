-- turn_refused, last_reply and mark_generating: what say and regenerate share (the loader
-- puts this file in front of them). In a Redis Cluster the same checks run as separate
-- single-slot steps (turn_check, turn_budget, turn_rate, say_commit, regenerate_commit), so
-- each is its own function.

-- Why the caller's copy of the conversation's meta is not the one Redis holds: {'unloaded'}
-- (Redis holds none), {'stale'} (its SHA-1 is not `meta_sha`), or nil. The web process checked
-- the owner on the copy it hashed, so a match proves the turn's user owns the conversation and
-- that the model and system prompt it read are the ones set now (set_meta changes the bytes;
-- a deleted conversation has none).
-- The say and regenerate scripts (and their cluster steps) ask it first.
local function meta_unproven(meta_key, meta_sha)
  local meta = redis.call('GET', meta_key)
  if not meta then return {'unloaded'} end
  if redis.sha1hex(meta) ~= meta_sha then return {'stale'} end
  return nil
end

-- Why the conversation cannot start a turn now ({'busy'}), or nil. Its callers asked
-- meta_unproven first (the meta is there).
local function turn_blocked(gen_key)
  if redis.call('EXISTS', gen_key) == 1 then return {'busy'} end
  return nil
end

-- In a Redis Cluster, the conversation's commit claims its turn (`fate_key`, turn_fate.lua):
-- false when the turn was declared void meanwhile (its web process took too long after the
-- budget step, and its reservation may be given back already): it must not start.
local function turn_claimed(fate_key, ttl)
  return redis.call('SET', fate_key, 'committed', 'NX', 'EX', ttl) ~= false
end

-- Counts the turn against the user's per-minute rate: {'rate', seconds until the window
-- ends} when it is over, or nil.
local function rate_refused(rate_key, turn_limit)
  local n = redis.call('INCR', rate_key)
  if n == 1 then redis.call('EXPIRE', rate_key, 61) end
  if n > tonumber(turn_limit) then return {'rate', redis.call('TTL', rate_key)} end
  return nil
end

-- Why a new turn may not start now, as the script's answer ({'busy'}, the
-- budget's refusal, {'rate', seconds until the window ends}), or nil when it may. Counts the
-- turn against the user's per-minute rate. `over_budget` says why the budget refuses, if it
-- does (before the rate counts the turn).
local function turn_refused(gen_key, rate_key, turn_limit, over_budget)
  return turn_blocked(gen_key) or over_budget() or rate_refused(rate_key, turn_limit)
end

-- The conversation's last message, decoded, when it is the model's (the reply a regenerate
-- replaces), or nil: nothing to regenerate.
local function last_reply(recent_key)
  local last = redis.call('LINDEX', recent_key, -1)
  if not last then return nil end
  local message = cjson.decode(last)
  if message.role ~= 'assistant' then return nil end
  return message
end

-- Mark the conversation as generating (the `gen` hash, alive for `lease` seconds unless the
-- worker's heartbeat renews it).
local function mark_generating(gen_key, message_id, lease)
  redis.call('HSET', gen_key, 'message_id', message_id, 'state', 'queued')
  redis.call('EXPIRE', gen_key, lease)
end
