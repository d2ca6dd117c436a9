-- revoke: write one revocation of a user's tokens and make their hash live at least
-- `keep_for` seconds, never shortening it: the write and the expiry in one step, so two
-- revocations at once cannot leave the shorter expiry last, and a crash between them cannot
-- leave the hash with none.
local revoked_key = KEYS[1]
local field = ARGV[1]
local value = ARGV[2]
local keep_for = tonumber(ARGV[3])

redis.call('HSET', revoked_key, field, value)
if redis.call('TTL', revoked_key) < keep_for then
  redis.call('EXPIRE', revoked_key, keep_for)
end
return 1
