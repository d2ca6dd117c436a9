-- append_piece: one event of a running generation (start, token), at most once.
-- Each event carries the generation's piece index; a retried call (the connection broke
-- before the reply) finds its index already recorded in the `gen` hash and appends nothing.
-- Returns the seq, 0 for a repeat, -1 (unloaded) when the conversation's seq is gone, or
-- -2 (lost) when `gen` no longer names this generation: Redis lost its data, and the worker
-- must republish the turn before anything else of it is appended.
local seq_key = KEYS[1]
local log_key = KEYS[2]
local channel = KEYS[3]
local persisted_key = KEYS[4]
local gen_key = KEYS[5]
local frame = ARGV[1]
local maxlen = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local message_id = ARGV[4]
local piece = tonumber(ARGV[5])

if redis.call('EXISTS', seq_key) == 0 then return -1 end
if redis.call('HGET', gen_key, 'message_id') ~= message_id then return -2 end
local last = tonumber(redis.call('HGET', gen_key, 'piece') or '-1')
if last >= piece then return 0 end
redis.call('HSET', gen_key, 'piece', piece)
return append_event(seq_key, log_key, channel, persisted_key, frame, maxlen, ttl)
