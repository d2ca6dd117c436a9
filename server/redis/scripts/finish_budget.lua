-- finish_budget: in a Redis Cluster, settle a turn's budget reservation with what it spent
-- (lib_budget.lua), on the user's slot, once per turn: `settled_key` (tagged like the
-- budget) records that it was, so a retried finish or a takeover settling again changes
-- nothing. finish.lua does this in its own step on one Redis. Returns 1 when it settled.
local budget_key = KEYS[1]
local settled_key = KEYS[2]
local epoch = ARGV[1]
local bucket = ARGV[2]
local reserved = ARGV[3]
local spent = ARGV[4]
local ttl = tonumber(ARGV[5])
local reply_id = ARGV[6] -- the turn's reservation record (lib_budget.lua) goes with it

if not redis.call('SET', settled_key, 1, 'NX', 'EX', ttl) then return 0 end
budget_settle(budget_key, epoch, bucket, reserved, spent)
if reply_id ~= '' then redis.call('HDEL', budget_key, 'r:' .. reply_id) end
return 1
