-- turn_check: in a Redis Cluster, the first step of a say or regenerate (say.lua and
-- regenerate.lua do everything at once on one Redis): would the conversation take the turn?
-- Answers as they do ({'dup'}, {'unloaded'}, {'busy'}, {'nothing'}) or {'ok'}; changes
-- nothing. It runs before the rate counts the turn, so a retried `say` (a duplicate) or a
-- busy conversation costs no turn of the user's rate, as on one Redis.
local meta_key = KEYS[1]
local gen_key = KEYS[2]
local said_key = KEYS[3]
local recent_key = KEYS[4]
local say_id = ARGV[1] -- '' for a regenerate
local regenerating = ARGV[2] -- '1' when the turn replaces the last reply

if say_id ~= '' and redis.call('SISMEMBER', said_key, say_id) == 1 then return {'dup'} end
if regenerating == '1' then
  local last = redis.call('LINDEX', recent_key, -1)
  if not last or cjson.decode(last).role ~= 'assistant' then return {'nothing'} end
end
return turn_blocked(meta_key, gen_key) or {'ok'}
