-- highwater begin: what a cycle needs to start, in one call: the state hash,
-- the size of the digest hash, and the renewal of the caller's lease (so an
-- entity that polls often never needs a renewal of its own).
--
-- KEYS[1] state, KEYS[2] digest, KEYS[3] lease (a partition's: its fence,
--         the highest lease token that read or wrote it)
-- ARGV[1] the caller's lease value ("" = no lease: nothing renewed)
-- ARGV[2] the lease in milliseconds
-- ARGV[3] a partition's cycle: the caller's lease token ("" = none). A
--         lower token than the fence's is refused ("lost"); a higher one
--         raises the fence, so that from this read on an older holder's
--         writes to the partition are refused (lua/dedup.lua, lua/commit.lua)
--
-- Returns {state as field, value, ..., digests, lease status, lease value}:
-- lease status "renewed" (the caller holds it, expiry pushed), "lost" (the
-- lease value is another holder's, or "" when nobody holds it) or "none".

local state, digests, lease = KEYS[1], KEYS[2], KEYS[3]
local mine, ms = ARGV[1], tonumber(ARGV[2])

local status, current = 'none', ''
if ARGV[3] ~= nil and ARGV[3] ~= '' then
  local token = tonumber(ARGV[3])
  local fence = tonumber(redis.call('GET', lease) or '0')
  if not token or token < fence then
    status = 'lost'
  elseif token > fence then
    redis.call('SET', lease, ARGV[3])
  end
elseif mine ~= '' then
  current = redis.call('GET', lease) or ''
  if current == mine then
    redis.call('PEXPIRE', lease, ms)
    status = 'renewed'
  else
    status = 'lost'
  end
end
return {redis.call('HGETALL', state), redis.call('HLEN', digests), status, current}
