-- budget_warn: whether the user's spending just reached the warning threshold in this
-- window for the first time. Returns {spent, limit} once per window (recording the bucket in
-- `warned`), else {}.
local budget_key = KEYS[1]
local group_limit = ARGV[1]
local oldest = tonumber(ARGV[2])
local bucket = ARGV[3]
local warn_at = tonumber(ARGV[4])

if redis.call('EXISTS', budget_key) == 0 then return {} end
local spent = budget_spent(budget_key, oldest)
local limit = budget_limit(budget_key, group_limit)
if limit <= 0 or spent < warn_at * limit then return {} end
if tonumber(redis.call('HGET', budget_key, 'warned') or '-1') >= oldest then return {} end
redis.call('HSET', budget_key, 'warned', bucket)
return {spent, limit}
