-- append_piece: one event of a running generation (start, token); the body of
-- append_piece.lua and, once per piece, of append_pieces.lua (the loader puts this file in
-- front).
--
-- Each event carries the generation's piece index; an index up to the `piece` field of the
-- `gen` hash (set when the worker publishes the turn again, so that the events still in
-- flight from before are dropped) is a repeat and appends nothing. That a retried call (the
-- connection broke before the reply) appends nothing twice is either its caller's mark to
-- keep (append_pieces.lua keeps one for a call of many pieces) or, with `recorded`, this
-- function's: the index of each piece appended is written to `gen` (raising that fence).
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
-- This runs once per token, so it does per piece only what each piece needs (take the seq
-- and check it against the floor, log, PUBLISH: three commands, and the `gen` read, once
-- for consecutive pieces of one conversation: `last` keeps what it read) and the rest once
-- every `MAINTAIN_EVERY` pieces of a generation, its first included: renew the log's and the
-- seq's expiry and trim the log (approximately, never past what PostgreSQL holds). Between
-- two trims the log holds at most that many events more than `maxlen`. Numbers arrive as
-- text: each is read once, by arithmetic (`tonumber` reads it twice), and the seq written
-- as text once (Lua's `..` formats a number as a double, far slower).
local MAINTAIN_EVERY = 64

local function append_piece(
  seq_key, log_key, channel, persisted_key, gen_key, frame, maxlen, ttl, message_id, piece, floor,
  last, recorded, worker
)
  if last.gen_key ~= gen_key then
    local gen = redis.call('HMGET', gen_key, 'message_id', 'piece', 'worker')
    last.gen_key, last.message_id, last.fence = gen_key, gen[1], gen[2] and gen[2] + 0 or -1
    last.worker = gen[3]
  end
  if last.message_id ~= message_id then
    if redis.call('EXISTS', seq_key) == 0 then return -1 end
    return -2
  end
  if worker ~= '' and last.worker and last.worker ~= worker then return -4 end
  local index = piece -- as given, text or number
  piece = piece + 0
  if last.fence >= piece then return 0 end
  local seq = redis.call('INCR', seq_key)
  -- the floor checked on what INCR returns (the counter before it is seq - 1), which saves a
  -- GET per piece; when behind, the counter ends at `floor` as seq_went_back leaves it
  if floor ~= '0' and seq - 1 < floor + 0 then
    redis.call('SET', seq_key, floor, 'KEEPTTL')
    return -3
  end
  -- a loaded seq always has an expiry: without one, INCR has just created it
  if seq == 1 and redis.call('TTL', seq_key) == -1 then
    redis.call('DEL', seq_key)
    return -1
  end
  local id = string.format('%d', seq)
  local framed = '{"seq":' .. id .. ',' .. string.sub(frame, 2)
  local added = redis.pcall('XADD', log_key, id, 'f', framed) -- entry id `seq`-0
  if type(added) == 'table' and added.err then
    -- the log holds an entry at or past this seq (left from before a reload): start it again
    redis.call('DEL', log_key)
    redis.call('XADD', log_key, id, 'f', framed)
    redis.call('EXPIRE', log_key, ttl)
  end
  redis.call('PUBLISH', channel, framed)
  if recorded then redis.call('HSET', gen_key, 'piece', index) end
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
