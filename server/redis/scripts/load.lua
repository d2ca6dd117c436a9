-- load: seed a conversation's Redis state from PostgreSQL, unless another process already
-- did (then returns 0). The seq never goes back: a counter still in Redis higher than
-- PostgreSQL's `last_seq` (events not persisted yet) is kept. Every persisted user message id
-- goes into the `said` set, so a `say` repeating one is a duplicate however long ago it was
-- said. The persisted transcript is kept as the joins' copy (`history`, covering
-- `persisted`), unless it is '' (too large to keep). Returns 1 when it seeded.
local meta_key = KEYS[1]
local seq_key = KEYS[2]
local recent_key = KEYS[3]
local persisted_key = KEYS[4]
local said_key = KEYS[5]
local history_key = KEYS[6]
local meta = ARGV[1]
local last_seq = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local persisted = ARGV[4]
local said_ids = ARGV[5] -- user message ids, separated by spaces
local history = ARGV[6]
local messages = {unpack(ARGV, 7)} -- the latest finished messages (JSON), oldest first

if redis.call('EXISTS', meta_key) == 1 then return 0 end
redis.call('SET', persisted_key, persisted, 'EX', ttl)
redis.call('SET', meta_key, meta, 'EX', ttl)
if history ~= '' then redis.call('SET', history_key, history, 'EX', ttl) end
local seq = tonumber(redis.call('GET', seq_key) or '0')
if seq < last_seq then seq = last_seq end
redis.call('SET', seq_key, seq, 'EX', ttl)
redis.call('DEL', recent_key)
for _, message in ipairs(messages) do redis.call('RPUSH', recent_key, message) end
if #messages > 0 then redis.call('EXPIRE', recent_key, ttl) end
for id in string.gmatch(said_ids, '%S+') do redis.call('SADD', said_key, id) end
if redis.call('EXISTS', said_key) == 1 then redis.call('EXPIRE', said_key, ttl) end
return 1
