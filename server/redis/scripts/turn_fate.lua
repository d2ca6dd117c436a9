-- turn_fate: in a Redis Cluster, on the conversation's slot, whether the turn `reply_id`
-- committed: 'committed' when say_commit or regenerate_commit took it; otherwise it is made
-- 'void' now, so that a commit still on its way (a stalled web process) refuses it. Either
-- way the answer is final, and budget_reconcile settles the turn's reservation by it.
local fate_key = KEYS[1]
local ttl = tonumber(ARGV[1])

redis.call('SET', fate_key, 'void', 'NX', 'EX', ttl)
return redis.call('GET', fate_key)
