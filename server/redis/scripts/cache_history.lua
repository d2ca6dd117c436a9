-- cache_history: keep the persisted transcript read from PostgreSQL for the next joins, if
-- it is still the latest: only while `persisted` holds the seq it covers (a persist since
-- then has moved `persisted` on, and the copy would be stale). Returns 1 when kept.
local persisted_key = KEYS[1]
local history_key = KEYS[2]
local history = ARGV[1]
local seq = ARGV[2]
local ttl = tonumber(ARGV[3])

if redis.call('GET', persisted_key) ~= seq then return 0 end
redis.call('SET', history_key, history, 'EX', ttl)
return 1
