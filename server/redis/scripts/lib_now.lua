-- now_ms: Redis's own clock in milliseconds, the one clock every process shares (the loader
-- puts this file in front of beat and admit).
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
