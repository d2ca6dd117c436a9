-- join: what a socket joining a conversation reads, in one step: the cached row, the last
-- seq and the logged events from `first_id` on (nothing can be appended between them).
-- With `with_history` = '1' the events are read after the seq PostgreSQL holds
-- (`persisted`) instead, and the cached persisted transcript comes with them, if any (the
-- caller checks that it covers `persisted`, else reads PostgreSQL).
-- Returns {meta or false, head (-1 when the seq is not loaded), entries, persisted or
-- false, history or false}.
local meta_key = KEYS[1]
local seq_key = KEYS[2]
local log_key = KEYS[3]
local persisted_key = KEYS[4]
local history_key = KEYS[5]
local first_id = ARGV[1]
local with_history = ARGV[2]

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
