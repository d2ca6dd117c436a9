-- begin: a worker starts a generation, in one step: the conversation's generation becomes
-- `message_id`'s, run by `worker` (its mark kept `lease` seconds), and what the worker needs
-- to begin is read: the cached row and the recent messages (the model's context), the
-- message id a `cancel` marked before the worker listened, and the index of the generation's
-- last appended event (a takeover continues after it).
-- Returns {meta or false, recent messages, cancelled message id or false, last piece or 0}.
local gen_key = KEYS[1]
local meta_key = KEYS[2]
local recent_key = KEYS[3]
local cancel_key = KEYS[4]
local message_id = ARGV[1]
local worker = ARGV[2]
local lease = ARGV[3]

redis.call('HSET', gen_key, 'message_id', message_id, 'worker', worker)
redis.call('EXPIRE', gen_key, lease)
local meta = redis.call('GET', meta_key)
local recent = {}
if meta then recent = redis.call('LRANGE', recent_key, 0, -1) end
local piece = tonumber(redis.call('HGET', gen_key, 'piece') or '0')
return {meta, recent, redis.call('GET', cancel_key), piece}
