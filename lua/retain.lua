
-- highwater retain (after lua/retention.lua): the stream's retention alone,
-- while polling is paused and no cycle commits, so that entries the groups
-- acknowledge still go and Redis memory comes down.
--
-- KEYS[1] stream, KEYS[2] the stream's dropped-entries hash
-- ARGV[1] max_stream_length (0 = none), ARGV[2] max_age in ms (0 = none),
-- ARGV[3] hard_max_stream_length (0 = none), ARGV[4] batch
--
-- Returns retain()'s {trimmed, more, groups}.

return retain(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]))
