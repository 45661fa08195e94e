-- highwater lease: who may write an entity. Taken, renewed and released
-- atomically, with the expiry on Redis's clock (PX), never the agents'.
--
-- The lease key holds "<token> <agent id>" while an agent holds the entity.
-- The token only grows: it comes from the entity's token hash, which never
-- expires. When that hash is missing (first lease ever, or Redis lost its
-- data) the counter restarts from Redis's clock in microseconds, so a token
-- issued after a loss is still above every token issued before it, and a
-- stale holder's lease value can never match again. The dedup and commit
-- scripts compare the caller's lease value with this key in the same atomic
-- call as their writes: that is the fence.
--
-- KEYS[1] lease   string  "<token> <agent id>", PX = the lease
-- KEYS[2] tokens  hash    token = last token issued, holder = its agent id
-- ARGV[1] "acquire", "renew" or "release"
-- ARGV[2] the caller's lease value ("" when it holds none)
-- ARGV[3] the caller's agent id
-- ARGV[4] the lease in milliseconds
-- ARGV[5] a channel told when a lease is released ("" = none): standing-by
--         agents listen there and take the entity over at once
--
-- Returns {status, value, ms, previous}:
--   {"acquired", value, 0, previous holder or ""}  a new token was issued
--   {"renewed", value, ms, ""}     the caller holds it; expiry pushed to ms from now
--   {"held", value, ms, ""}        another holder's value, expiring in ms
--   {"released", "", 0, ""}        the caller held it; now nobody does
--   {"lost", value or "", ms, ""}  renew/release of a value that is not current

local lease, tokens = KEYS[1], KEYS[2]
local mode, mine, agent, ms, channel = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local current = redis.call('GET', lease)

if current and current == mine then
  if mode == 'release' then
    redis.call('DEL', lease)
    if channel ~= '' then
      redis.call('PUBLISH', channel, 'released')
    end
    return {'released', '', 0, ''}
  end
  redis.call('PEXPIRE', lease, ms)
  return {'renewed', current, ms, ''}
end

if mode ~= 'acquire' or current then
  local status = 'held'
  if mode ~= 'acquire' then
    status = 'lost'
  end
  local ttl = 0
  if current then
    ttl = redis.call('PTTL', lease)
  end
  return {status, current or '', ttl, ''}
end

local previous = redis.call('HGET', tokens, 'holder') or ''
local token
if redis.call('HEXISTS', tokens, 'token') == 1 then
  -- As digits: Lua would print a number this large in exponent form.
  token = string.format('%.0f', redis.call('HINCRBY', tokens, 'token', 1))
else
  local now = redis.call('TIME')
  token = string.format('%.0f', tonumber(now[1]) * 1000000 + tonumber(now[2]))
  redis.call('HSET', tokens, 'token', token)
end
local value = token .. ' ' .. agent
redis.call('SET', lease, value, 'PX', ms)
redis.call('HSET', tokens, 'holder', agent)
return {'acquired', value, 0, previous}
