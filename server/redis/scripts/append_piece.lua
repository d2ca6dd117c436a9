-- append_piece: one event of a running generation (lib_append_piece.lua says what it does
-- and returns). The worker sends its pieces through append_pieces.lua, many in one call; this
-- one, kept for a single piece, records the index of the piece it appends in `gen`, so a
-- retry of it (or of any piece indexed up to there) appends nothing. For callers that run no
-- generation (no worker's fence).
local seq_key = KEYS[1]
local log_key = KEYS[2]
local channel = KEYS[3]
local persisted_key = KEYS[4]
local gen_key = KEYS[5]
local frame = ARGV[1]
local maxlen = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local message_id = ARGV[4]
local piece = tonumber(ARGV[5])
local floor = ARGV[6]

return append_piece(
  seq_key, log_key, channel, persisted_key, gen_key, frame, maxlen, ttl, message_id, piece, floor,
  {}, true, ''
)
