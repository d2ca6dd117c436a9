-- join: what the sockets joining conversations read (of any conversations on one Redis; of
-- one slot in a cluster), each join in one step: the cached row, the last seq and the logged
-- events from its `first_id` on (nothing can be appended between them). With its
-- `with_history` = '1' the events are read after the seq PostgreSQL holds (`persisted`)
-- instead, and the cached persisted transcript comes with them, if any (the caller checks
-- that it covers `persisted`, else reads PostgreSQL). One call for the joins of many
-- sockets, since each call costs a web process far more (packing, the round trip's share,
-- the reply) than the reads cost Redis.
--
-- KEYS: five per join (meta, seq, log, persisted, history of its conversation); ARGV: two
-- per join (first_id, with_history). Returns one result per join, in order:
-- {meta or false, head (-1 when the seq is not loaded), entries, persisted or false,
-- history or false}.
local join_keys = {unpack(KEYS, 1)} -- meta_key, seq_key, log_key, persisted_key, history_key...
local join_args = {unpack(ARGV, 1)} -- first_id, with_history...

local function join(meta_key, seq_key, log_key, persisted_key, history_key, first_id, with_history)
  local meta = redis.call('GET', meta_key)
  local head = redis.call('GET', seq_key)
  if not meta or not head then return {meta, -1, {}, false, false} end
  local persisted, history = false, false
  if with_history == '1' then
    persisted = redis.call('GET', persisted_key)
    history = redis.call('GET', history_key)
    if not persisted or not history then return {meta, tonumber(head), {}, persisted, false} end
    first_id = (tonumber(persisted) + 1) .. '-0'
  end
  return {meta, tonumber(head), redis.call('XRANGE', log_key, first_id, '+'), persisted, history}
end

local results = {}
for i = 1, #join_args / 2 do
  local k, a = (i - 1) * 5, (i - 1) * 2
  results[i] = join(
    join_keys[k + 1], join_keys[k + 2], join_keys[k + 3], join_keys[k + 4], join_keys[k + 5],
    join_args[a + 1], join_args[a + 2]
  )
end
return results
