-- append_pieces: the pieces of many generations (of any conversations on one Redis; of one
-- slot in a cluster) in one call, each as lib_append_piece.lua appends it, in the order
-- given. One call per batch instead of one per piece: a worker that keeps up appends about
-- one token per piece, and each script call costs it far more (packing, the round trip's
-- share, the reply) than the Lua costs Redis.
--
-- A call appends nothing twice: `call_key` (unique to the call, in its slot) keeps, for
-- `kept` seconds, which of its pieces were not appended (",2,5,"; ",," when none). A retry
-- of the call (the connection broke before the reply; the caller resends a call for less
-- than `kept` seconds) finds it: the pieces appended then answer 0 (a repeat), the others
-- are tried again. One mark per call rather than a write per piece, and `last` keeps the
-- `gen` read for the next piece: per piece the script does little more than its commands.
-- With `kept` 0 (the caller's choice for a call of a few pieces, where the mark would cost
-- as much and hold a key for nothing) there is no mark: each appended piece's index is
-- written to `gen`, and a retry finds its pieces repeats there.
--
-- KEYS: the call's mark, then five per piece (seq, log, channel, persisted, gen of its
-- conversation); ARGV: maxlen, ttl, kept, the calling worker's name ('' for none), then four
-- per piece (frame, message id, piece index, floor). Returns one result per piece, in order, as append_piece returns it. A
-- piece's result does not depend on the pieces of other conversations in the same call.
local call_key = KEYS[1]
local maxlen = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local kept = tonumber(ARGV[3])
local worker = ARGV[4]
local piece_keys = {unpack(KEYS, 2)} -- seq_key, log_key, channel, persisted_key, gen_key...
local piece_args = {unpack(ARGV, 5)} -- frame, message_id, piece, floor...

local marked = kept > 0
local done = marked and redis.call('GET', call_key) -- false unless this call ran before
local results, refused = {}, {}
local last = {}
for i = 1, #piece_args / 4 do
  if done and not string.find(done, ',' .. i .. ',', 1, true) then
    results[i] = 0
  else
    local k, a = (i - 1) * 5, (i - 1) * 4
    local result = append_piece(
      piece_keys[k + 1], piece_keys[k + 2], piece_keys[k + 3], piece_keys[k + 4],
      piece_keys[k + 5], piece_args[a + 1], maxlen, ttl, piece_args[a + 2], piece_args[a + 3],
      piece_args[a + 4], last, not marked, worker
    )
    results[i] = result
    if result <= 0 then refused[#refused + 1] = i end
  end
end
if marked and #refused < #results then
  redis.call('SET', call_key, ',' .. table.concat(refused, ',') .. ',', 'EX', kept)
end
return results
