-- set_meta: replace the cached conversation row, keeping its expiry; only when it is cached
-- (returns 1), so a write never resurrects a conversation Redis let expire (returns 0).
local meta_key = KEYS[1]
local meta = ARGV[1]

if redis.call('EXISTS', meta_key) == 0 then return 0 end
redis.call('SET', meta_key, meta, 'KEEPTTL')
return 1
