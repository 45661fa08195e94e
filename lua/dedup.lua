-- highwater dedup: one chunk of rows of one entity, applied atomically.
--
-- A row is emitted iff its digest differs from the digest of the last
-- version emitted for its key (DESIGN.md §4). Comparing epochs instead would
-- drop a second update within one second (ties) and a version committed after
-- a newer-stamped one (commit order != timestamp order).
--
-- KEYS[1] seen    sorted set  pkey -> epoch of the last emitted version
-- KEYS[2] digest  hash        pkey -> digest of the last emitted version
-- KEYS[3] stream  stream      the change messages
-- KEYS[4] state   hash        watermark, figures; `writes` counts chunks that emitted
-- KEYS[5] lease   string      the entity's lease (lua/lease.lua)
-- ARGV[1] max stream length (XADD MAXLEN ~), 0 = no cap
-- ARGV[2] variant
-- ARGV[3] "1" to include the payload field, "0" for key-only messages
-- ARGV[4] "1" if the state hash must exist: the cycle started from it (or an
--         earlier chunk of the cycle created it)
-- ARGV[5] the caller's lease value ("" = unfenced: a single agent without leases)
-- ARGV[6..] per row, 5 values: pkey, epoch, digest, op, payload
--
-- The fence: when the caller's lease value is not the lease's current
-- value (another agent took the entity over, or the lease expired), the
-- script writes nothing and fails with "HWFENCED <current value>". It is
-- checked here, in the same atomic call as the writes: a check before the
-- call would not do, the caller can pause between the two.
--
-- Returns {emitted, writes}: how many rows were emitted, and the state's
-- write counter after this call. Returns false, applying nothing, when the
-- state hash must exist but does not: Redis lost the entity's state during
-- the cycle (FLUSHALL, a restart without persistence), and re-emitting into
-- the empty state would pass the loss off as a first start.

local seen, digests, stream, state, lease = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local maxlen = tonumber(ARGV[1])
local variant = ARGV[2]
local with_payload = ARGV[3] == '1'

if ARGV[4] == '1' and redis.call('EXISTS', state) == 0 then
  return false
end

if ARGV[5] ~= '' then
  local current = redis.call('GET', lease)
  if current ~= ARGV[5] then
    return redis.error_reply('HWFENCED ' .. (current or ''))
  end
end

local emitted = 0
for i = 6, #ARGV, 5 do
  local pkey, epoch, digest, op = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('HGET', digests, pkey) ~= digest then
    redis.call('ZADD', seen, epoch, pkey)
    redis.call('HSET', digests, pkey, digest)
    local fields = {'pkey', pkey, 'epoch', epoch, 'variant', variant, 'op', op}
    if with_payload then
      fields[#fields + 1] = 'payload'
      fields[#fields + 1] = ARGV[i + 4]
    end
    if maxlen > 0 then
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(fields))
    else
      redis.call('XADD', stream, '*', unpack(fields))
    end
    emitted = emitted + 1
  end
end

local writes
if emitted > 0 then
  writes = redis.call('HINCRBY', state, 'writes', 1)
else
  writes = tonumber(redis.call('HGET', state, 'writes') or '0')
end
return {emitted, writes}
