-- open_approval: record a tool call waiting for a person's approval, unless it is recorded
-- already (a worker resuming the turn opens it again: the first expiry stands). Returns the
-- expiry, in milliseconds of Redis's clock. The record outlives its expiry by retain_ms, so
-- whoever resumes the turn still reads how it was settled.
local approval_key = KEYS[1]
local owner = ARGV[1]
local tool = ARGV[2]
local arguments = ARGV[3]
local message_id = ARGV[4]
local timeout_ms = tonumber(ARGV[5])
local retain_ms = tonumber(ARGV[6])

local existing = redis.call('HGET', approval_key, 'expires_at')
if existing then return tonumber(existing) end
local expires_at = now_ms() + timeout_ms
redis.call('HSET', approval_key, 'owner', owner, 'tool', tool, 'arguments', arguments,
  'message_id', message_id, 'expires_at', expires_at, 'state', 'pending')
redis.call('PEXPIREAT', approval_key, expires_at + retain_ms)
return expires_at
