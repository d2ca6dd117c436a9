-- settle_approval: one answer to a pending approval, applied atomically, so that of two tabs
-- answering at the same instant exactly one wins (the rules of protocol/approvals.py).
-- decision is 'approve' or 'deny' (from user, who must be the owner) or 'expire' (from
-- Parley, settles only a call past its expiry). Returns {outcome, state, by, reason}:
-- outcome 'settled' (this answer won), 'already' (settled before, or expired: the state
-- says which), 'forbidden' (not the owner), 'unknown' (no such call) or 'pending' (an
-- 'expire' before the expiry).
local approval_key = KEYS[1]
local user = ARGV[1]
local decision = ARGV[2]
local reason = ARGV[3]

local record = redis.call('HMGET', approval_key, 'owner', 'state', 'expires_at', 'by', 'reason')
local owner, state, expires_at = record[1], record[2], tonumber(record[3])
if not owner then return {'unknown', '', '', ''} end
if decision ~= 'expire' and user ~= owner then
  return {'forbidden', state, record[4] or '', record[5] or ''}
end
if state ~= 'pending' then return {'already', state, record[4] or '', record[5] or ''} end
local due = now_ms() >= expires_at
if decision == 'expire' or due then
  if not due then return {'pending', 'pending', '', ''} end
  redis.call('HSET', approval_key, 'state', 'expired')
  if decision == 'expire' then return {'settled', 'expired', '', ''} end
  return {'already', 'expired', '', ''}
end
local settled = 'denied'
if decision == 'approve' then settled = 'approved' end
redis.call('HSET', approval_key, 'state', settled, 'by', user, 'reason', reason)
return {'settled', settled, user, reason}
