-- highwater agents: the live agents sharing a key prefix, and how many
-- leases each holds, so that each can take its fair share of the entities.
-- A sorted set (member = agent id, score = when its registration expires,
-- on Redis's clock, in milliseconds) and a hash (agent id -> leases held).
-- An agent re-registers a few times per lease; one that stops doing so
-- (killed, cut off, paused) drops out after a lease, one that shuts down
-- leaves at once.
--
-- KEYS[1] live  sorted set
-- KEYS[2] held  hash
-- ARGV[1] "beat" (register or renew), "leave" or "list"
-- ARGV[2] the caller's agent id
-- ARGV[3] the lease in milliseconds
-- ARGV[4] how many leases the caller holds ("beat")
-- ARGV[5] a channel told when an agent joins or leaves ("" = none), so that
--         the others rebalance at once
--
-- Returns the live agents after the call:
-- {id, ms until it expires, leases held, ...}.

local live, held = KEYS[1], KEYS[2]
local mode, agent, ms = ARGV[1], ARGV[2], tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

if mode ~= 'list' then
  local expired = redis.call('ZRANGEBYSCORE', live, '-inf', now)
  for first = 1, #expired, 1000 do
    local last = math.min(first + 999, #expired)
    redis.call('HDEL', held, unpack(expired, first, last))
  end
  redis.call('ZREMRANGEBYSCORE', live, '-inf', now)
end
local changed = 0
if mode == 'beat' then
  changed = redis.call('ZADD', live, now + ms, agent)
  redis.call('HSET', held, agent, ARGV[4])
elseif mode == 'leave' then
  changed = redis.call('ZREM', live, agent)
  redis.call('HDEL', held, agent)
end
if changed > 0 and ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], mode)
end

local agents = redis.call('ZRANGEBYSCORE', live, '(' .. now, '+inf', 'WITHSCORES')
local out = {}
for i = 1, #agents, 2 do
  out[#out + 1] = agents[i]
  out[#out + 1] = tonumber(agents[i + 1]) - now
  out[#out + 1] = tonumber(redis.call('HGET', held, agents[i]) or '0')
end
return out
