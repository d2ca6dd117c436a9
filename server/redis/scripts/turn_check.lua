-- turn_check: in a Redis Cluster, the first step of a say or regenerate (say.lua and
-- regenerate.lua do everything at once on one Redis): would the conversation take the turn?
-- Answers as they do ({'dup'}, {'unloaded'}, {'stale'}, {'busy'}, {'nothing'}) or {'ok', cost}, cost
-- being the turn's worst case in tokens (lib_budget.lua), which turn_budget reserves next;
-- changes nothing. It runs before the budget and the rate count the turn, so a retried `say`
-- (a duplicate) or a busy conversation costs neither, as on one Redis.
local meta_key = KEYS[1]
local gen_key = KEYS[2]
local said_key = KEYS[3]
local recent_key = KEYS[4]
local say_id = ARGV[1] -- '' for a regenerate
local regenerating = ARGV[2] -- '1' when the turn replaces the last reply
local message = ARGV[3] -- the user's message ('' for a regenerate)
local context_tokens = ARGV[4]
local max_tokens = ARGV[5]
local meta_sha = ARGV[6]

local unproven = meta_unproven(meta_key, meta_sha)
if unproven then return unproven end
if say_id ~= '' and redis.call('SISMEMBER', said_key, say_id) == 1 then return {'dup'} end
if regenerating == '1' and not last_reply(recent_key) then return {'nothing'} end
local blocked = turn_blocked(gen_key)
if blocked then return blocked end
return {'ok', budget_worst_case(recent_key, message, context_tokens, max_tokens)}
