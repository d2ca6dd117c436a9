-- seq_floor: raise the conversation's seq counter to `floor`, the highest seq Redis
-- acknowledged to a generation's worker, if it is below (lib_seq_floor.lua); 1 when it was
-- raised. A worker that publishes its turn again because Redis lost data calls it first:
-- the events it publishes then are appended past `floor`. Without it the first of them would
-- be refused (-3, behind) when the counter went back (a Redis restarted empty and seeded
-- from PostgreSQL, a replica promoted without the last events), the rest appended, and the
-- worker would publish the whole turn a second time.
local seq_key = KEYS[1]
local floor = ARGV[1]

if seq_went_back(seq_key, floor) then return 1 end
return 0
