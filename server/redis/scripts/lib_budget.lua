-- A user's token budget (server/redis/budgets.py): a hash of buckets `b:<start>` -> tokens
-- spent or reserved in it, `epoch` (which rebuild from the ledger it is), `limit` (the
-- user's own budget, set through the server API, over the group's) and `warned` (the bucket
-- when `usage_warning` was last sent). The loader puts this file in front of the scripts
-- that use it.

-- The tokens counted from bucket `oldest` on; buckets older than that are dropped.
local function budget_spent(budget_key, oldest)
  local spent = 0
  local fields = redis.call('HGETALL', budget_key)
  for i = 1, #fields, 2 do
    local name = fields[i]
    if string.sub(name, 1, 2) == 'b:' then
      if tonumber(string.sub(name, 3)) < oldest then
        redis.call('HDEL', budget_key, name)
      else
        spent = spent + tonumber(fields[i + 1])
      end
    end
  end
  return spent
end

-- The user's own budget if one was set, else the group's (0: unlimited).
local function budget_limit(budget_key, group_limit)
  local own = redis.call('HGET', budget_key, 'limit')
  if own then return tonumber(own) end
  return tonumber(group_limit)
end

-- Why `cost` tokens may not be reserved: {'budget'} when Redis holds no budget for the user
-- (Python rebuilds it from the ledger and retries), {'quota', spent, limit} when they would
-- pass the limit; nil when they may.
local function budget_refused(budget_key, group_limit, oldest, cost)
  if redis.call('EXISTS', budget_key) == 0 then return {'budget'} end
  local spent = budget_spent(budget_key, oldest)
  local limit = budget_limit(budget_key, group_limit)
  if limit > 0 and spent + cost > limit then return {'quota', spent, limit} end
  return nil
end

-- Reserve `cost` tokens in `bucket`; returns the budget's epoch (for the settlement).
local function budget_reserve(budget_key, bucket, cost, ttl)
  redis.call('HINCRBY', budget_key, 'b:' .. bucket, cost)
  redis.call('EXPIRE', budget_key, ttl)
  return redis.call('HGET', budget_key, 'epoch') or ''
end

-- The turn's worst case: its prompt (`message` and the recent messages, newest first, about 3
-- characters a token, at most the context budget: only as many are read as could fit) and a
-- whole reply of `max_tokens`.
local function budget_worst_case(recent_key, message, context_tokens, max_tokens)
  local cap = tonumber(context_tokens)
  local chars = string.len(message)
  local last = -1
  while math.floor(chars / 3) + 1 < cap do
    local items = redis.call('LRANGE', recent_key, last - 19, last)
    for i = #items, 1, -1 do chars = chars + string.len(items[i]) end
    if #items < 20 then break end
    last = last - 20
  end
  return math.min(math.floor(chars / 3) + 1, cap) + tonumber(max_tokens)
end

-- Replace a turn's reservation with what it really spent. A budget rebuilt from the ledger
-- since the reservation (another epoch) never held it, and takes the whole spending; a
-- budget Redis lost is left alone (rebuilt from the ledger, which gets this turn).
local function budget_settle(budget_key, epoch, bucket, reserved, spent)
  if redis.call('EXISTS', budget_key) == 0 then return end
  local delta = tonumber(spent)
  if redis.call('HGET', budget_key, 'epoch') == epoch then delta = delta - tonumber(reserved) end
  if delta ~= 0 then redis.call('HINCRBY', budget_key, 'b:' .. bucket, delta) end
end

-- A cluster turn's reservation record, `r:<reply id>` -> '<bucket> <cost> <deadline ms>
-- <conversation>' (deadline 0: held until the turn's settlement). turn_budget makes it;
-- budget_reconcile holds it (the turn committed) or gives it back (it never will);
-- finish_budget removes it when it settles the turn.
local function budget_record(budget_key, reply_id, bucket, cost, deadline, conversation)
  local record = bucket .. ' ' .. cost .. ' ' .. deadline .. ' ' .. conversation
  redis.call('HSET', budget_key, 'r:' .. reply_id, record)
end

-- The reply ids and conversations of the records past their deadline, flat: {id, c, ...}.
local function budget_overdue(budget_key, now)
  local overdue = {}
  local fields = redis.call('HGETALL', budget_key)
  for i = 1, #fields, 2 do
    if string.sub(fields[i], 1, 2) == 'r:' then
      local _, _, deadline, conversation = string.match(fields[i + 1], '(%S+) (%S+) (%S+) (%S+)')
      local due = tonumber(deadline)
      if due > 0 and due < now then
        table.insert(overdue, string.sub(fields[i], 3))
        table.insert(overdue, conversation)
      end
    end
  end
  return overdue
end
