-- mark_persisted: PostgreSQL now holds the conversation's events up to `persisted`; record
-- it (it only moves forward: returns 0 otherwise) and trim the log to the last `maxlen`
-- events, never past an event PostgreSQL does not have, and drop the cached transcript,
-- which no longer is the latest. Returns 1 when it moved. A seq counter below `persisted`
-- (a replica promoted without the last events of a turn PostgreSQL now holds) is raised to
-- it first, so that no later event takes a seq PostgreSQL already has.
local persisted_key = KEYS[1]
local log_key = KEYS[2]
local seq_key = KEYS[3]
local history_key = KEYS[4]
local persisted = tonumber(ARGV[1])
local ttl = ARGV[2]
local maxlen = tonumber(ARGV[3])

raise_to(seq_key, persisted)
local current = tonumber(redis.call('GET', persisted_key) or '-1')
if persisted <= current then return 0 end
redis.call('SET', persisted_key, persisted, 'EX', ttl)
redis.call('DEL', history_key)
local keep = tonumber(redis.call('GET', seq_key) or '0') - maxlen + 1
if persisted + 1 < keep then keep = persisted + 1 end
if keep > 1 then redis.call('XTRIM', log_key, 'MINID', '~', keep) end
return 1
