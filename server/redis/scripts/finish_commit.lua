-- finish_commit: in a Redis Cluster, end a generation once (lib_finish.lua) on the
-- conversation's slot, and keep the finished turn beside the `done` seq (`turn_key`) so
-- that whoever queues it for PostgreSQL after this step (server/redis/turns.py) can queue
-- it again after a crash. Returns the seq of `done`, or -1 (unloaded), -3 (behind) or -4
-- (taken over: lib_finish.lua).
local seq_key = KEYS[1]
local log_key = KEYS[2]
local channel = KEYS[3]
local persisted_key = KEYS[4]
local gen_key = KEYS[5]
local recent_key = KEYS[6]
local finished_key = KEYS[7]
local turn_key = KEYS[8]
local frame = ARGV[1]
local reply = ARGV[2]
local reply_id = ARGV[3]
local turn = ARGV[4]
local maxlen = tonumber(ARGV[5])
local ttl = tonumber(ARGV[6])
local replaces = ARGV[7] -- '' when the reply replaces none
local recent_kept = tonumber(ARGV[8])
local floor = ARGV[9] -- the highest seq acknowledged to the worker
local worker = ARGV[10] -- the worker finishing it ('' for none)

local conversation = {
  seq = seq_key, log = log_key, channel = channel, persisted = persisted_key,
  gen = gen_key, recent = recent_key, finished = finished_key,
}
local seq, fresh = finish_turn(conversation, frame, reply, reply_id, maxlen, ttl, replaces,
  recent_kept, floor, worker)
if fresh then redis.call('SET', turn_key, turn, 'EX', ttl) end
return seq
