-- budget_reconcile: in a Redis Cluster, decide a turn's reservation record (lib_budget.lua)
-- by the turn's fate: 'committed' (its conversation took the turn: the reservation is held
-- until finish_budget settles it) or anything else (it never will: the reservation is given
-- back, once, as the record goes). Returns 1 when it gave tokens back.
local budget_key = KEYS[1]
local reply_id = ARGV[1]
local fate = ARGV[2]

local field = 'r:' .. reply_id
local record = redis.call('HGET', budget_key, field)
if not record then return 0 end
local bucket, cost, _, conversation = string.match(record, '(%S+) (%S+) (%S+) (%S+)')
if fate == 'committed' then
  redis.call('HSET', budget_key, field, bucket .. ' ' .. cost .. ' 0 ' .. conversation)
  return 0
end
redis.call('HDEL', budget_key, field)
if redis.call('HEXISTS', budget_key, 'b:' .. bucket) == 0 then return 0 end
redis.call('HINCRBY', budget_key, 'b:' .. bucket, -tonumber(cost))
return 1
