-- keep_user_message: what say (one Redis) and say_commit (a cluster) do with an accepted
-- user message (the loader puts this file in front of them): remember its id (a retry is a
-- duplicate), append its `message` event (lib_append_event.lua) and keep it for the model's
-- context. Returns the event's seq.
local function keep_user_message(k, say_id, frame, message, maxlen, ttl, recent_kept)
  redis.call('SADD', k.said, say_id)
  redis.call('EXPIRE', k.said, ttl)
  local seq = append_event(k.seq, k.log, k.channel, k.persisted, frame, maxlen, ttl)
  redis.call('RPUSH', k.recent, message)
  redis.call('LTRIM', k.recent, -recent_kept, -1)
  redis.call('EXPIRE', k.recent, ttl)
  redis.call('EXPIRE', k.meta, ttl)
  return seq
end
