-- admit_user: one more socket for a user on process `process`, unless the user already has
-- `limit` open across every live process (`alive(process)` says which are). Counts of
-- processes no longer alive (they died) are dropped first, so a crash never locks a user
-- out. Returns 1 (admitted) or 0. Shared by admit and admit_live.
local function admit_user(user_key, process, limit, alive)
  local total = 0
  local counts = redis.call('HGETALL', user_key)
  for i = 1, #counts, 2 do
    if alive(counts[i]) then
      total = total + tonumber(counts[i + 1])
    else
      redis.call('HDEL', user_key, counts[i])
    end
  end
  if total >= limit then return 0 end
  redis.call('HINCRBY', user_key, process, 1)
  return 1
end
