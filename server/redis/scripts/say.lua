-- say: accept a user's turn. Refuses a `say` id already in the conversation's set of user
-- message ids ({'dup'}), an unloaded
-- conversation, a busy one, a user over the turn rate (see lib_turn_guards.lua); otherwise
-- appends the user's `message` event, keeps the message for the model's context, marks the
-- conversation as generating and queues the job (with the message's seq) on the turns
-- Stream. Returns {'ok', seq}.
-- Besides the conversation's keys it touches a turns shard and `parley:rate:<user>`: three
-- slots, so on a Redis Cluster the same is done in steps (turn_check, turn_rate, say_commit,
-- then the job's XADD: server/redis/turns.py).
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

if redis.call('SISMEMBER', said_key, say_id) == 1 then return {'dup'} end
local refused = turn_refused(meta_key, gen_key, rate_key, turn_limit)
if refused then return refused end
local conversation = {
  seq = seq_key, log = log_key, channel = channel, persisted = persisted_key,
  said = said_key, recent = recent_key, meta = meta_key,
}
local seq = keep_user_message(conversation, say_id, frame, message, maxlen, ttl, recent_kept)
local job_with_seq = string.sub(job, 1, -2) .. ',"user_seq":' .. seq .. '}'
start_generation(gen_key, reply_id, lease, turns_key, job_with_seq)
return {'ok', seq}
