-- settle_approval: one answer to a pending approval, applied atomically, so that of two tabs
-- answering at the same instant exactly one wins (the rules of protocol/approvals.py), and
-- the `approval_resolved` event appended in the same step: every tab sees the outcome once.
-- decision is 'approve' or 'deny' (from user, who must be the owner), 'expire' (from
-- Parley, settles only a call past its expiry) or 'withdraw' (from Parley: the turn was
-- cancelled, the call will never run; `resolved` then says `cancelled`). `resolved` is the event this answer
-- appends when it wins, `expired` the one appended when it finds the call past its expiry
-- (both encoded without `seq`). Returns {outcome, state, by, reason}:
-- outcome 'settled' (this answer won), 'already' (settled before, or expired: the state
-- says which), 'forbidden' (not the owner), 'unknown' (no such call) or 'pending' (an
-- 'expire' before the expiry).
local approval_key = KEYS[1]
local seq_key = KEYS[2]
local log_key = KEYS[3]
local channel = KEYS[4]
local persisted_key = KEYS[5]
local user = ARGV[1]
local decision = ARGV[2]
local reason = ARGV[3]
local resolved = ARGV[4]
local expired = ARGV[5]
local maxlen = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])

local function announce(frame)
  if redis.call('EXISTS', seq_key) == 1 then
    append_event(seq_key, log_key, channel, persisted_key, frame, maxlen, ttl)
  end
end

local record = redis.call('HMGET', approval_key, 'owner', 'state', 'expires_at', 'by', 'reason')
local owner, state, expires_at = record[1], record[2], tonumber(record[3])
if not owner then return {'unknown', '', '', ''} end
if decision ~= 'expire' and decision ~= 'withdraw' and user ~= owner then
  return {'forbidden', state, record[4] or '', record[5] or ''}
end
if state ~= 'pending' then return {'already', state, record[4] or '', record[5] or ''} end
local due = now_ms() >= expires_at
if decision == 'expire' or due then
  if not due then return {'pending', 'pending', '', ''} end
  redis.call('HSET', approval_key, 'state', 'expired')
  announce(expired)
  if decision == 'expire' then return {'settled', 'expired', '', ''} end
  return {'already', 'expired', '', ''}
end
local settled = 'denied'
if decision == 'approve' then settled = 'approved' end
if decision == 'withdraw' then settled = 'cancelled' end
redis.call('HSET', approval_key, 'state', settled, 'by', user, 'reason', reason)
announce(resolved)
return {'settled', settled, user, reason}
