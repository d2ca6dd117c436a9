-- budget_load: seed a user's budget from the ledger, unless Redis holds it already (another
-- process was first). `buckets` is a JSON object bucket -> tokens; `limit` the user's own
-- budget ('' for none); `epoch` names this rebuild. Returns 1 if it seeded, 0 if not.
local budget_key = KEYS[1]
local buckets = ARGV[1]
local limit = ARGV[2]
local epoch = ARGV[3]
local ttl = tonumber(ARGV[4])

if redis.call('EXISTS', budget_key) == 1 then return 0 end
redis.call('HSET', budget_key, 'epoch', epoch)
if limit ~= '' then redis.call('HSET', budget_key, 'limit', limit) end
for bucket, tokens in pairs(cjson.decode(buckets)) do
  redis.call('HSET', budget_key, 'b:' .. bucket, tokens)
end
redis.call('EXPIRE', budget_key, ttl)
return 1
