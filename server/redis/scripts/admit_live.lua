-- admit_live: on a Redis Cluster, admit (lib_admit.lua) one socket of one user, on the
-- user's own slot; the live processes are given (read from the registry just before), not
-- looked up. Returns 1 (admitted) or 0.
local user_key = KEYS[1]
local process = ARGV[1]
local limit = tonumber(ARGV[2])
local live = ARGV[3] -- the live processes' ids, separated by spaces

local alive_set = {}
for id in string.gmatch(live, '%S+') do alive_set[id] = true end
local function alive(other) return alive_set[other] == true end

return admit_user(user_key, process, limit, alive)
