-- turn_rate: in a Redis Cluster, count one turn against the user's per-minute rate (the
-- user's own slot). Returns {'rate', seconds until the window ends} when it is over, or
-- {'ok'}.
local rate_key = KEYS[1]
local turn_limit = tonumber(ARGV[1])

return rate_refused(rate_key, turn_limit) or {'ok'}
