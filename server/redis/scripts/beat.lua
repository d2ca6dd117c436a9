-- beat: a web process's heartbeat. Keeps `process` in the registry of live processes (a
-- sorted set scored by deadline, on Redis's clock) for `ttl_ms` more, and drops the
-- processes whose deadline has passed. Their socket counts go at the next admission.
local processes_key = KEYS[1]
local process = ARGV[1]
local ttl_ms = tonumber(ARGV[2])

local now = now_ms()
redis.call('ZREMRANGEBYSCORE', processes_key, '-inf', '(' .. now)
redis.call('ZADD', processes_key, now + ttl_ms, process)
return 1
