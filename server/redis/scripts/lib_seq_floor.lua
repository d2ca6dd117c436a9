-- seq_went_back: whether the conversation's seq counter is below `floor`, the highest seq
-- Redis acknowledged to the generation's worker; if so it is raised to `floor`.
-- After a Redis Cluster failover the promoted replica may lack the last events the old
-- primary acknowledged (replication is asynchronous): its counter is behind seqs that tabs
-- already hold, and handing them out again would give a tab the same seq twice with other
-- content. The caller appends nothing and says so (-3): the worker publishes the turn so far
-- again past `floor`, and tabs that miss the lost events see a gap the log cannot fill and
-- reset. `floor` 0: the caller knows of no acknowledged seq. Used by lib_finish.lua (the
-- loader puts this file in front); lib_append_piece.lua does the same check after its INCR.
local function seq_went_back(seq_key, floor)
  floor = tonumber(floor)
  if floor == nil or floor <= 0 then return false end
  local current = tonumber(redis.call('GET', seq_key) or '0')
  if current >= floor then return false end
  redis.call('SET', seq_key, floor, 'KEEPTTL')
  return true
end

-- raise_to: a counter Redis holds (a conversation's seq or persisted) below `floor` raised
-- to it, its expiry kept; a missing one stays missing (the conversation is not loaded:
-- nothing to protect). Returns what the counter holds then (nil when missing). Used by
-- cache_history.lua and mark_persisted.lua, whose floor is what PostgreSQL holds.
local function raise_to(key, floor)
  local value = tonumber(redis.call('GET', key))
  if value and value < floor then
    redis.call('SET', key, floor, 'KEEPTTL')
    return floor
  end
  return value
end
