-- live_processes: on a Redis Cluster, the ids of the web processes whose heartbeat deadline
-- (Redis's clock) has not passed, for admit_live (the registry is on its own slot).
local processes_key = KEYS[1]

return redis.call('ZRANGEBYSCORE', processes_key, now_ms(), '+inf')
