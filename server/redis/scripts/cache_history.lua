-- cache_history: keep the persisted transcript read from PostgreSQL for the next joins, if
-- it is still the latest: only while `persisted` holds the seq it covers (a persist since
-- then has moved `persisted` on, and the copy would be stale). Returns 1 when kept.
-- What was just read from PostgreSQL is also a floor, in the same step: a seq counter below
-- the row's `last_seq` is raised to it, and `persisted` below the transcript's seq to that
-- (only forward, and only for a conversation Redis holds). Redis is behind PostgreSQL only
-- when it lost what it had acknowledged (a replica promoted without the last events of a
-- turn that was persisted meanwhile): left as it is, the next events would take seqs that
-- PostgreSQL and the tabs already hold, and the joins would wait for a head that is behind
-- what they were sent. `history` '' keeps no copy (too large), the floors still apply.
local persisted_key = KEYS[1]
local history_key = KEYS[2]
local seq_key = KEYS[3]
local history = ARGV[1]
local seq = ARGV[2]
local ttl = tonumber(ARGV[3])
local last_seq = tonumber(ARGV[4])

raise_to(seq_key, last_seq)
local persisted = raise_to(persisted_key, tonumber(seq))
if persisted ~= tonumber(seq) or history == '' then return 0 end
redis.call('SET', history_key, history, 'EX', ttl)
return 1
