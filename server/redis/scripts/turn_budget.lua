-- turn_budget: in a Redis Cluster, the user's budget step of a say or regenerate (the user's
-- slot), after turn_check and before turn_rate, as say.lua orders them on one Redis: refuses
-- ({'budget'} or {'quota', spent, limit}, lib_budget.lua) or reserves the turn's worst case
-- `cost` and returns {'ok', the budget's epoch}. A reservation whose turn is then refused
-- (rate, or the conversation's commit) is given back with finish_budget and `spent` 0.
local budget_key = KEYS[1]
local group_limit = ARGV[1]
local oldest = tonumber(ARGV[2])
local bucket = ARGV[3]
local ttl = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])

local refused = budget_refused(budget_key, group_limit, oldest, cost)
if refused then return refused end
return {'ok', budget_reserve(budget_key, bucket, cost, ttl)}
