-- regenerate: generate the conversation's last reply again. Answers {'nothing'} when the
-- last message is not the model's, refuses like say (see lib_turn_guards.lua), otherwise
-- marks the conversation as generating and queues the job naming the reply it replaces.
-- Returns {'ok', 0, replaced message id}.
-- Besides the conversation's keys it touches a turns shard and `parley:rate:<user>`: three
-- slots, so on a Redis Cluster the same is done in steps (turn_check, turn_rate,
-- regenerate_commit, then the job's XADD: server/redis/turns.py).
local gen_key = KEYS[1]
local recent_key = KEYS[2]
local meta_key = KEYS[3]
local turns_key = KEYS[4]
local rate_key = KEYS[5]
local job = ARGV[1]
local reply_id = ARGV[2]
local turn_limit = tonumber(ARGV[3])
local lease = tonumber(ARGV[4])

local last = redis.call('LINDEX', recent_key, -1)
if not last then return {'nothing'} end
local message = cjson.decode(last)
if message.role ~= 'assistant' then return {'nothing'} end
local refused = turn_refused(meta_key, gen_key, rate_key, turn_limit)
if refused then return refused end
local job_with_replaces = string.sub(job, 1, -2) .. ',"replaces":"' .. message.id .. '"}'
start_generation(gen_key, reply_id, lease, turns_key, job_with_replaces)
return {'ok', 0, message.id}
