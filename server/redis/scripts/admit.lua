-- admit: one more socket for each of a batch of users, on process `process` (lib_admit.lua),
-- a process being alive while its deadline in the registry has not passed. Returns 1
-- (admitted) or 0 per user key.
-- The users' keys and the registry are on different slots: on a Redis Cluster, admit_live
-- runs instead, once per user.
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
  results[k] = admit_user(user_key, process, limit, alive)
end
return results
