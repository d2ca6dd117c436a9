-- regenerate: generate the conversation's last reply again. Answers {'nothing'} when the
-- last message is not the model's, refuses like say (see lib_turn_guards.lua), otherwise
-- marks the conversation as generating and queues the job naming the reply it replaces.
-- Reserves the turn's worst case in the user's budget as say does.
-- Returns {'ok', 0, replaced message id, waits} (waits as say's).
-- Besides the conversation's keys it touches a turns shard, `parley:rate:<user>`, the
-- user's budget, fair queue and running count (one slot), the queue's ring and `told`, the
-- workers' slots and every turns shard (the fair queue's capacity): seven slots or more, so on a
-- Redis Cluster (where the fair queue is off) the same is done in steps (turn_check,
-- turn_budget, turn_rate, regenerate_commit, then the job's XADD: server/redis/turns.py).
local gen_key = KEYS[1]
local recent_key = KEYS[2]
local meta_key = KEYS[3]
local turns_key = KEYS[4]
local rate_key = KEYS[5]
local budget_key = KEYS[6]
local queue_key = KEYS[7] -- the user's fair queue
local ring_key = KEYS[8]
local told_key = KEYS[9]
local running_key = KEYS[10] -- the user's running generations
local slots_key = KEYS[11] -- the workers' slots
local streams = {unpack(KEYS, 12)} -- every shard of the turns Stream
local job = ARGV[1]
local reply_id = ARGV[2]
local turn_limit = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])
local budget_limit = ARGV[5]
local budget_oldest = tonumber(ARGV[6])
local budget_bucket = ARGV[7]
local budget_ttl = tonumber(ARGV[8])
local context_tokens = ARGV[9]
local max_tokens = ARGV[10]
local fair = ARGV[11] -- '1': through the fair queue
local user = ARGV[12]
local per_user = ARGV[13] -- limits.generations_per_user
local meta_sha = ARGV[14] -- SHA-1 of the caller's copy of the meta (lib_turn_guards.lua)

local unproven = meta_unproven(meta_key, meta_sha)
if unproven then return unproven end
local message = last_reply(recent_key)
if not message then return {'nothing'} end
local cost = budget_worst_case(recent_key, '', context_tokens, max_tokens)
local refused = turn_refused(gen_key, rate_key, turn_limit, function()
  return budget_refused(budget_key, budget_limit, budget_oldest, cost)
end)
if refused then return refused end
local epoch = budget_reserve(budget_key, budget_bucket, cost, budget_ttl)
local job_with_replaces = string.sub(job, 1, -2) .. ',"replaces":"' .. message.id
  .. '","budget_reserved":' .. cost .. ',"budget_epoch":' .. cjson.encode(epoch) .. '}'
local waits = start_generation(gen_key, reply_id, lease, turns_key, job_with_replaces,
  {fair = fair, key = queue_key, ring_key = ring_key, told_key = told_key, user = user,
   running_key = running_key, slots_key = slots_key, streams = streams, per_user = per_user})
return {'ok', 0, message.id, waits}
