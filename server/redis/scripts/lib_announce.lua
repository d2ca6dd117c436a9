-- told_due: whether a waiting turn's tabs are to be told `position` now (announce.lua on one
-- Redis, announce_told.lua in a cluster); when so, records it as told at `now_ms`.
-- Due when the turn still waits in the fair queue (it has an entry in `told`, from say or
-- regenerate until dispatch or unqueue) and its position is new to the tabs: never told, or
-- changed and last told at least a second ago (`now_ms`, the caller's clock), or changed to 0:
-- the turn is next, which its tabs learn at once however recently they heard of it (its
-- `start` may follow within the second).
local function told_due(told_key, message_id, position, now_ms)
  local told = redis.call('HGET', told_key, message_id)
  if not told then return false end
  local told_position, told_ms = string.match(told, '^(%-?%d+):(%d+)$')
  if told_position == position then return false end
  if position ~= '0' and now_ms - tonumber(told_ms) < 1000 then return false end
  redis.call('HSET', told_key, message_id, position .. ':' .. now_ms)
  return true
end
