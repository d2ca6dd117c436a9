-- finish: end a generation, once (lib_finish.lua: the `done` event, or a refused turn's
-- `error` with no reply), settle the turn's budget reservation with what it spent
-- (lib_budget.lua) and queue the finished turn for PostgreSQL on its persist Stream, all in
-- the same step. A retried call finds the `done` seq it recorded and returns it without
-- appending, settling or queueing again. Returns the seq of `done`, or -1 (unloaded) when
-- the conversation's seq is gone, -3 (behind) or -4 (taken over: lib_finish.lua).
-- Besides the conversation's keys it touches a persist shard and the user's budget: three
-- slots, so on a Redis Cluster finish_commit runs instead, then the turn is queued and the
-- budget settled (finish_budget) after it (server/redis/turns.py).
local seq_key = KEYS[1]
local log_key = KEYS[2]
local channel = KEYS[3]
local persisted_key = KEYS[4]
local gen_key = KEYS[5]
local recent_key = KEYS[6]
local finished_key = KEYS[7]
local persist_key = KEYS[8]
local budget_key = KEYS[9]
local frame = ARGV[1]
local reply = ARGV[2]
local reply_id = ARGV[3]
local turn = ARGV[4]
local maxlen = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local replaces = ARGV[7] -- '' when the reply replaces none (or there is no reply)
local recent_kept = tonumber(ARGV[8])
local budget_epoch = ARGV[9]
local budget_bucket = ARGV[10]
local budget_reserved = ARGV[11]
local spent = ARGV[12]
local floor = ARGV[13] -- the highest seq acknowledged to the worker
local worker = ARGV[14] -- the worker finishing it ('' for none)

local conversation = {
  seq = seq_key, log = log_key, channel = channel, persisted = persisted_key,
  gen = gen_key, recent = recent_key, finished = finished_key,
}
local seq, fresh = finish_turn(conversation, frame, reply, reply_id, maxlen, ttl, replaces,
  recent_kept, floor, worker)
if fresh then
  budget_settle(budget_key, budget_epoch, budget_bucket, budget_reserved, spent)
  redis.call('XADD', persist_key, '*', 'turn', turn, 'done_seq', seq)
end
return seq
