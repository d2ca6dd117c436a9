-- leave: fewer sockets on process `process` for a batch of users (one count per key, same
-- order). Returns the number of users. The users' keys are on different Redis Cluster slots.
local user_keys = {unpack(KEYS, 1)} -- each user's connections hash
local process = ARGV[1]
local counts = {unpack(ARGV, 2)} -- how many of the user's sockets closed

for k, user_key in ipairs(user_keys) do
  redis.call('HINCRBY', user_key, process, -tonumber(counts[k]))
end
return #user_keys
