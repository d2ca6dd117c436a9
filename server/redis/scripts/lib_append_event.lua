-- append_event: give a conversation's next event its seq, keep it in the log, PUBLISH it.
-- Shared by append, append_piece, say and finish (the loader puts this file in front).
--
-- `frame` is a JSON object encoded without `seq`; `{"seq":N,` is spliced in front so every
-- process forwards the same bytes. The log (a Stream whose entry id is the seq) keeps the
-- last `maxlen` events and never trims one past `persisted_key`, the seq PostgreSQL holds
-- up to: a tab joining with the persisted history must find the rest here. Returns the seq.
local function append_event(seq_key, log_key, channel, persisted_key, frame, maxlen, ttl)
  local seq = redis.call('INCR', seq_key)
  local framed = '{"seq":' .. seq .. ',' .. string.sub(frame, 2)
  local keep = seq - tonumber(maxlen) + 1
  local persisted = redis.call('GET', persisted_key)
  if persisted and tonumber(persisted) + 1 < keep then keep = tonumber(persisted) + 1 end
  if keep < 1 then keep = 1 end
  local ok = pcall(redis.call, 'XADD', log_key, 'MINID', '~', keep, seq .. '-0', 'f', framed)
  if not ok then
    -- the log holds an entry at or past this seq (left from before a reload): start it again
    redis.call('DEL', log_key)
    redis.call('XADD', log_key, seq .. '-0', 'f', framed)
  end
  redis.call('PUBLISH', channel, framed)
  redis.call('EXPIRE', log_key, ttl)
  redis.call('EXPIRE', seq_key, ttl)
  return seq
end
