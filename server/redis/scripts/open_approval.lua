-- open_approval: record a tool call waiting for a person's approval and append its
-- `approval_request` event, unless it is recorded already (a worker resuming the turn opens
-- it again: the first expiry stands, and the tabs saw the request once). Returns
-- {expiry in milliseconds of Redis's clock, the event's seq: 0 when the call was open
-- already, -1 when the conversation's seq is not in Redis (no event appended)}. The record
-- outlives its expiry by retain_ms, so whoever resumes the turn still reads how it was settled.
-- `request` is the event encoded without `seq` and `expires_at`, both spliced in here.
local approval_key = KEYS[1]
local seq_key = KEYS[2]
local log_key = KEYS[3]
local channel = KEYS[4]
local persisted_key = KEYS[5]
local owner = ARGV[1]
local tool = ARGV[2]
local arguments = ARGV[3]
local message_id = ARGV[4]
local timeout_ms = tonumber(ARGV[5])
local retain_ms = tonumber(ARGV[6])
local request = ARGV[7]
local maxlen = tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])

local existing = redis.call('HGET', approval_key, 'expires_at')
if existing then return {tonumber(existing), 0} end
local expires_at = now_ms() + timeout_ms
redis.call('HSET', approval_key, 'owner', owner, 'tool', tool, 'arguments', arguments,
  'message_id', message_id, 'expires_at', expires_at, 'state', 'pending')
redis.call('PEXPIREAT', approval_key, expires_at + retain_ms)
if redis.call('EXISTS', seq_key) == 0 then return {expires_at, -1} end
local seconds = string.format('%d.%03d', math.floor(expires_at / 1000), expires_at % 1000)
local framed = '{"expires_at":' .. seconds .. ',' .. string.sub(request, 2)
return {expires_at, append_event(seq_key, log_key, channel, persisted_key, framed, maxlen, ttl)}
