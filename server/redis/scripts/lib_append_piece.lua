-- append_piece: one event of a running generation (start, token), at most once; the body of
-- append_piece.lua and, once per piece, of append_pieces.lua (the loader puts this file in
-- front).
--
-- Each event carries the generation's piece index; a retried call (the connection broke
-- before the reply) finds its index already recorded in the `gen` hash and appends nothing.
-- Returns the seq, 0 for a repeat, -1 (unloaded) when the conversation's seq is gone, or
-- -2 (lost) when `gen` no longer names this generation: Redis lost its data, and the worker
-- must republish the turn before anything else of it is appended; or -3 (behind) when the
-- seq counter is below `floor`, the highest seq the worker was acknowledged (a failover to a
-- replica that lacks events, as lib_seq_floor.lua explains): the counter is raised and the worker
-- republishes the turn; or -4 (taken over) when `gen` names a worker other than `worker`:
-- the generation was taken over (this worker's lease lapsed while it was cut off from Redis)
-- and its events are the other's to append; this worker stops the turn. `worker` '' (a
-- caller that runs no generation, such as the load kit) is not checked.
--
-- This runs once per token, so it does per piece only what each piece needs (check and
-- record the index, take the seq and check it against the floor, log, PUBLISH: five
-- commands) and the rest once every
-- `MAINTAIN_EVERY` pieces of a generation, its first included: renew the log's and the
-- seq's expiry and trim the log (approximately, never past what PostgreSQL holds). Between
-- two trims the log holds at most that many events more than `maxlen`.
local MAINTAIN_EVERY = 64

local function append_piece(
  seq_key, log_key, channel, persisted_key, gen_key, frame, maxlen, ttl, message_id, piece, floor,
  worker
)
  local gen = redis.call('HMGET', gen_key, 'message_id', 'piece', 'worker')
  if gen[1] ~= message_id then
    if redis.call('EXISTS', seq_key) == 0 then return -1 end
    return -2
  end
  if worker ~= '' and gen[3] and gen[3] ~= worker then return -4 end
  if tonumber(gen[2] or '-1') >= piece then return 0 end
  local seq = redis.call('INCR', seq_key)
  -- the floor checked on what INCR returns (the counter before it is seq - 1), which saves a
  -- GET per piece; when behind, the counter ends at `floor` as seq_went_back leaves it
  floor = tonumber(floor)
  if floor and floor > 0 and seq - 1 < floor then
    redis.call('SET', seq_key, floor, 'KEEPTTL')
    return -3
  end
  -- a loaded seq always has an expiry: without one, INCR has just created it
  if seq == 1 and redis.call('TTL', seq_key) == -1 then
    redis.call('DEL', seq_key)
    return -1
  end
  redis.call('HSET', gen_key, 'piece', piece)
  local framed = '{"seq":' .. seq .. ',' .. string.sub(frame, 2)
  local added = redis.pcall('XADD', log_key, seq .. '-0', 'f', framed)
  if type(added) == 'table' and added.err then
    -- the log holds an entry at or past this seq (left from before a reload): start it again
    redis.call('DEL', log_key)
    redis.call('XADD', log_key, seq .. '-0', 'f', framed)
    redis.call('EXPIRE', log_key, ttl)
  end
  redis.call('PUBLISH', channel, framed)
  if piece % MAINTAIN_EVERY == 1 then
    local keep = seq - maxlen + 1
    local persisted = redis.call('GET', persisted_key)
    if persisted and tonumber(persisted) + 1 < keep then keep = tonumber(persisted) + 1 end
    if keep > 1 then redis.call('XTRIM', log_key, 'MINID', '~', keep) end
    redis.call('EXPIRE', log_key, ttl)
    redis.call('EXPIRE', seq_key, ttl)
  end
  return seq
end
