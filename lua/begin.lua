-- highwater begin: what a cycle needs to start, in one call: the state hash,
-- the size of the digest hash, and the renewal of the caller's lease (so an
-- entity that polls often never needs a renewal of its own).
--
-- KEYS[1] state, KEYS[2] digest, KEYS[3] lease
-- ARGV[1] the caller's lease value ("" = no lease: nothing renewed)
-- ARGV[2] the lease in milliseconds
--
-- Returns {state as field, value, ..., digests, lease status, lease value}:
-- lease status "renewed" (the caller holds it, expiry pushed), "lost" (the
-- lease value is another holder's, or "" when nobody holds it) or "none".

local state, digests, lease = KEYS[1], KEYS[2], KEYS[3]
local mine, ms = ARGV[1], tonumber(ARGV[2])

local status, current = 'none', ''
if mine ~= '' then
  current = redis.call('GET', lease) or ''
  if current == mine then
    redis.call('PEXPIRE', lease, ms)
    status = 'renewed'
  else
    status = 'lost'
  end
end
return {redis.call('HGETALL', state), redis.call('HLEN', digests), status, current}
