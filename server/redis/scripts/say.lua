-- say: accept a user's turn. Refuses a `say` id already in the conversation's set of user
-- message ids ({'dup'}), an unloaded
-- conversation, a caller's copy of its meta that is not Redis's ({'stale'}: it also proves
-- the owner), a busy one, a user over budget or over the turn rate (see
-- lib_turn_guards.lua, lib_budget.lua); otherwise reserves the turn's worst case in the
-- user's budget, appends the user's `message` event, keeps the message for the model's
-- context, marks the conversation as generating and queues the job (with the message's seq,
-- the reservation and the budget's epoch) on the turns Stream or in the user's fair queue
-- (lib_fair_queue.lua). Returns {'ok', seq, waits}: waits 1 when the turn waits in the
-- fair queue, 0 when it went to the workers.
-- Besides the conversation's keys it touches a turns shard, `parley:rate:<user>`, the
-- user's budget, fair queue and running count (one slot), the queue's ring and `told`, the
-- workers' slots and every turns shard (the fair queue's capacity): seven slots or more, so on a
-- Redis Cluster (where the fair queue is off) the same is done in steps (turn_check,
-- turn_budget, turn_rate, say_commit, then the job's XADD: server/redis/turns.py).
local seq_key = KEYS[1]
local log_key = KEYS[2]
local channel = KEYS[3]
local persisted_key = KEYS[4]
local gen_key = KEYS[5]
local said_key = KEYS[6] -- the conversation's user message ids
local recent_key = KEYS[7]
local meta_key = KEYS[8]
local turns_key = KEYS[9]
local rate_key = KEYS[10]
local budget_key = KEYS[11]
local queue_key = KEYS[12] -- the user's fair queue
local ring_key = KEYS[13]
local told_key = KEYS[14]
local running_key = KEYS[15] -- the user's running generations
local slots_key = KEYS[16] -- the workers' slots
local streams = {unpack(KEYS, 17)} -- every shard of the turns Stream
local frame = ARGV[1]
local message = ARGV[2]
local reply_id = ARGV[3]
local job = ARGV[4]
local maxlen = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local turn_limit = tonumber(ARGV[7])
local lease = tonumber(ARGV[8])
local recent_kept = tonumber(ARGV[9])
local say_id = ARGV[10]
local budget_limit = ARGV[11] -- the group's; 0: unlimited
local budget_oldest = tonumber(ARGV[12]) -- the first bucket the window covers
local budget_bucket = ARGV[13] -- the bucket this turn counts in
local budget_ttl = tonumber(ARGV[14])
local context_tokens = ARGV[15]
local max_tokens = ARGV[16]
local fair = ARGV[17] -- '1': through the fair queue
local user = ARGV[18]
local per_user = ARGV[19] -- limits.generations_per_user
local meta_sha = ARGV[20] -- SHA-1 of the caller's copy of the meta (lib_turn_guards.lua)

local unproven = meta_unproven(meta_key, meta_sha)
if unproven then return unproven end
if redis.call('SISMEMBER', said_key, say_id) == 1 then return {'dup'} end
local cost = budget_worst_case(recent_key, message, context_tokens, max_tokens)
local refused = turn_refused(gen_key, rate_key, turn_limit, function()
  return budget_refused(budget_key, budget_limit, budget_oldest, cost)
end)
if refused then return refused end
local epoch = budget_reserve(budget_key, budget_bucket, cost, budget_ttl)
local conversation = {
  seq = seq_key, log = log_key, channel = channel, persisted = persisted_key,
  said = said_key, recent = recent_key, meta = meta_key,
}
local seq = keep_user_message(conversation, say_id, frame, message, maxlen, ttl, recent_kept)
local job_with_seq = string.sub(job, 1, -2) .. ',"user_seq":' .. seq
  .. ',"budget_reserved":' .. cost .. ',"budget_epoch":' .. cjson.encode(epoch) .. '}'
local waits = start_generation(gen_key, reply_id, lease, turns_key, job_with_seq,
  {fair = fair, key = queue_key, ring_key = ring_key, told_key = told_key, user = user,
   running_key = running_key, slots_key = slots_key, streams = streams, per_user = per_user})
return {'ok', seq, waits}
