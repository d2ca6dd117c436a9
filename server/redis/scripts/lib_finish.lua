-- finish_turn: what finish (one Redis) and finish_commit (a cluster) share (the loader puts
-- this file, after lib_append_event.lua, in front of them). Appends the `done` event (or a
-- refused turn's `error`) once, keeps the reply for the model's context (dropping the reply
-- it replaces; a refused turn has no reply, '', and changes neither) and clears the
-- `gen` hash if it still names this generation. Returns the seq of `done` and whether this
-- call appended it (false: a retry found the seq recorded), -1 (unloaded) when the
-- conversation's seq is gone, or -3 (behind) when the seq counter went back below `floor`
-- (lib_seq_floor.lua, which the loader puts in front too), or -4 (taken over) when `gen`
-- names this generation run by a worker other than `worker` (as lib_append_piece.lua; ''
-- is not checked).
-- The finished key holds the `done` seq and the worker that finished ("SEQ WORKER"; "SEQ"
-- when no worker was named): a call by another worker finds the turn finished by someone
-- else, not its own reply lost, and is told -4 too. A stale worker whose `finish` was on
-- its way when it froze would otherwise take the other's seq for its own and go on as if
-- it had finished (a second finish hook, a second queueing).
local function finish_turn(
  k, frame, reply, reply_id, maxlen, ttl, replaces, recent_kept, floor, worker
)
  local before = redis.call('GET', k.finished)
  if before then
    local seq, by = string.match(before, '^(%d+) ?(.*)$')
    if worker ~= '' and by ~= '' and by ~= worker then return -4, false end
    return tonumber(seq), false
  end
  if redis.call('EXISTS', k.seq) == 0 then return -1, false end
  if worker ~= '' then
    local gen = redis.call('HMGET', k.gen, 'message_id', 'worker')
    if gen[1] == reply_id and gen[2] and gen[2] ~= worker then return -4, false end
  end
  if seq_went_back(k.seq, floor) then return -3, false end
  local seq = append_event(k.seq, k.log, k.channel, k.persisted, frame, maxlen, ttl)
  local finished = seq
  if worker ~= '' then finished = seq .. ' ' .. worker end
  redis.call('SET', k.finished, finished, 'EX', ttl)
  if replaces ~= '' then
    for _, item in ipairs(redis.call('LRANGE', k.recent, -5, -1)) do
      if cjson.decode(item).id == replaces then redis.call('LREM', k.recent, -1, item) end
    end
  end
  if reply ~= '' then
    redis.call('RPUSH', k.recent, reply)
    redis.call('LTRIM', k.recent, -recent_kept, -1)
  end
  if redis.call('HGET', k.gen, 'message_id') == reply_id then redis.call('DEL', k.gen) end
  return seq, true
end
