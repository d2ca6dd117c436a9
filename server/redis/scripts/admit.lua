-- admit: one more socket for each of a batch of users, on process `process`, unless the
-- user already has `limit` open across every live process. A user's connections hash holds
-- one count per process; counts of processes no longer live in the registry (they died) are
-- dropped first, so a crash never locks a user out. Returns 1 (admitted) or 0 per user key.
-- The users' keys and the registry are on different Redis Cluster slots.
local processes_key = KEYS[1]
local user_keys = {unpack(KEYS, 2)} -- each user's connections hash, one per socket to admit
local process = ARGV[1]
local limit = tonumber(ARGV[2])

local now = now_ms()
local function alive(other)
  local deadline = redis.call('ZSCORE', processes_key, other)
  return deadline and tonumber(deadline) >= now
end

local results = {}
for k, user_key in ipairs(user_keys) do
  local total = 0
  local counts = redis.call('HGETALL', user_key)
  for i = 1, #counts, 2 do
    if alive(counts[i]) then
      total = total + tonumber(counts[i + 1])
    else
      redis.call('HDEL', user_key, counts[i])
    end
  end
  if total >= limit then
    results[k] = 0
  else
    redis.call('HINCRBY', user_key, process, 1)
    results[k] = 1
  end
end
return results
