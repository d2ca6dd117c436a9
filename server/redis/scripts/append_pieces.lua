-- append_pieces: the pieces of many generations (of any conversations on one Redis; of one
-- slot in a cluster) in one call, each exactly as append_piece.lua appends it
-- (lib_append_piece.lua), in the order given. One call per batch instead of one per piece:
-- a worker that keeps up appends about one token per piece, and each script call costs it
-- far more (packing, the round trip's share, the reply) than the Lua costs Redis.
--
-- KEYS: five per piece (seq, log, channel, persisted, gen of its conversation); ARGV: maxlen,
-- ttl, the calling worker's name ('' for none), then four per piece (frame, message id, piece
-- index, floor). Returns one result per piece, in
-- order, as append_piece returns it. A piece's result does not depend on the pieces of other
-- conversations in the same call.
local maxlen = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local piece_keys = {unpack(KEYS, 1)} -- seq_key, log_key, channel, persisted_key, gen_key...
local worker = ARGV[3]
local piece_args = {unpack(ARGV, 4)} -- frame, message_id, piece, floor...

local results = {}
for i = 1, #piece_args / 4 do
  local k, a = (i - 1) * 5, (i - 1) * 4
  results[i] = append_piece(
    piece_keys[k + 1], piece_keys[k + 2], piece_keys[k + 3], piece_keys[k + 4], piece_keys[k + 5],
    piece_args[a + 1], maxlen, ttl, piece_args[a + 2], tonumber(piece_args[a + 3]),
    piece_args[a + 4], worker
  )
end
return results
