-- turn_budget: in a Redis Cluster, the user's budget step of a say or regenerate (the user's
-- slot), after turn_check and before turn_rate, as say.lua orders them on one Redis: refuses
-- ({'budget'} or {'quota', spent, limit}, lib_budget.lua) or reserves the turn's worst case
-- `cost` and returns {'ok', the budget's epoch}. A reservation whose turn is then refused
-- (rate, or the conversation's commit) is given back with budget_reconcile.
--
-- The reservation is recorded (`r:<reply id>`, lib_budget.lua) with a deadline `hold_ms`
-- ahead: a web process that dies before the conversation's commit leaves it behind. A
-- refusal over the limit lists, after {'quota', spent, limit}, the reply id and the
-- conversation of each reservation past its deadline: server/redis/turns.py asks their
-- conversations whether they committed (turn_fate), gives back those that never will and
-- asks again.
local budget_key = KEYS[1]
local group_limit = ARGV[1]
local oldest = tonumber(ARGV[2])
local bucket = ARGV[3]
local ttl = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])
local reply_id = ARGV[6]
local conversation = ARGV[7]
local hold_ms = tonumber(ARGV[8])

local refused = budget_refused(budget_key, group_limit, oldest, cost)
if refused then
  if refused[1] == 'quota' then
    for _, overdue in ipairs(budget_overdue(budget_key, now_ms())) do
      table.insert(refused, overdue)
    end
  end
  return refused
end
local epoch = budget_reserve(budget_key, bucket, cost, ttl)
budget_record(budget_key, reply_id, bucket, cost, now_ms() + hold_ms, conversation)
return {'ok', epoch}
