-- finish: end a generation, once. Appends the `done` event (or a refused turn's `error`),
-- keeps the reply for the model's context (dropping the reply it replaces; a refused turn
-- has no reply, '', and changes neither), queues the finished turn for PostgreSQL on the
-- persist Stream and clears the `gen` hash if it still names this generation. A retried
-- call finds the `done` seq it recorded and returns it without appending again. Returns the
-- seq of `done`, or -1 (unloaded) when the conversation's seq is gone. Settles the turn's
-- budget reservation with what it spent (lib_budget.lua), once, with the `done`.
-- Besides the conversation's keys it touches `parley:persist` and the user's budget: three
-- Redis Cluster slots.
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

local before = redis.call('GET', finished_key)
if before then return tonumber(before) end
if redis.call('EXISTS', seq_key) == 0 then return -1 end
local seq = append_event(seq_key, log_key, channel, persisted_key, frame, maxlen, ttl)
redis.call('SET', finished_key, seq, 'EX', ttl)
budget_settle(budget_key, budget_epoch, budget_bucket, budget_reserved, spent)
if replaces ~= '' then
  for _, item in ipairs(redis.call('LRANGE', recent_key, -5, -1)) do
    if cjson.decode(item).id == replaces then redis.call('LREM', recent_key, -1, item) end
  end
end
if reply ~= '' then
  redis.call('RPUSH', recent_key, reply)
  redis.call('LTRIM', recent_key, -recent_kept, -1)
end
redis.call('XADD', persist_key, '*', 'turn', turn, 'done_seq', seq)
if redis.call('HGET', gen_key, 'message_id') == reply_id then redis.call('DEL', gen_key) end
return seq
