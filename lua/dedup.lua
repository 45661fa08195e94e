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
-- KEYS[4] state   hash        watermark, figures; `writes` counts chunks that
--                             emitted, `chunk` names the last chunk applied
-- KEYS[5] lease   string      the entity's lease (lua/lease.lua)
-- ARGV[1] max stream length (XADD MAXLEN ~), 0 = no cap; not applied while
--         the stream has consumer groups (lua/retention.lua trims it then,
--         at the commit, as far as the groups have acknowledged)
-- ARGV[2] variant
-- ARGV[3] "1" to include the payload field, "0" for key-only messages
-- ARGV[4] "1" if the state hash must exist: the cycle started from it (or an
--         earlier chunk of the cycle created it)
-- ARGV[5] the caller's lease value ("" = unfenced: a single agent without
--         leases), or "#<token>" for a partition (see below)
-- ARGV[6] the chunk that must have been applied last ("" = no check): with
--         several chunks of a cycle in flight, a chunk whose predecessor
--         failed (or has not arrived) is refused with "HWCHAIN <last applied>"
-- ARGV[7] this chunk's name, recorded as `chunk` ("" = record nothing; only
--         sent with ARGV[4] = "1", so it never creates the state hash)
-- ARGV[8..] per row, 5 values: pkey, epoch, digest, op, payload
--
-- The rows are decided in order, as if one after the other: a key that
-- appears twice in the chunk compares its second version with the first's
-- digest when the first was emitted here. The state is looked up with one
-- HMGET and written with one ZADD and one HSET (the last emitted version of
-- each key), the messages with one XADD per emitted row, in row order.
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
local after, name = ARGV[6], ARGV[7]

if ARGV[4] == '1' and redis.call('EXISTS', state) == 0 then
  return false
end

-- A partition of an entity (partitions = N: its keys are in another slot
-- than the lease's) is fenced by the lease's token instead, "#<token>": the
-- partition's lease key holds the highest token that read (lua/begin.lua)
-- or wrote it, and a lower one is refused, so once a new holder began a
-- cycle on the partition the old one cannot write it.
local token, fenced_by = nil, 0
if string.sub(ARGV[5], 1, 1) == '#' then
  token = tonumber(string.sub(ARGV[5], 2))
  fenced_by = tonumber(redis.call('GET', lease) or '0')
  if not token or token < fenced_by then
    return redis.error_reply('HWFENCED ')
  end
elseif ARGV[5] ~= '' then
  local current = redis.call('GET', lease)
  if current ~= ARGV[5] then
    return redis.error_reply('HWFENCED ' .. (current or ''))
  end
end

if after ~= '' then
  local last = redis.call('HGET', state, 'chunk')
  if last ~= after then
    return redis.error_reply('HWCHAIN ' .. (last or ''))
  end
end

-- unpack() is limited by Lua's C stack: commands take their arguments in
-- slices of this many keys.
local slice = 1000
local first_row = 8
local rows = (#ARGV - first_row + 1) / 5

local pkeys = {}
for r = 1, rows do
  pkeys[r] = ARGV[first_row + (r - 1) * 5]
end
local stored
if rows <= slice then
  stored = rows > 0 and redis.call('HMGET', digests, unpack(pkeys)) or {}
else
  stored = {}
  for from = 1, rows, slice do
    local to = math.min(from + slice - 1, rows)
    local got = redis.call('HMGET', digests, unpack(pkeys, from, to))
    for j = 1, #got do
      stored[from + j - 1] = got[j]
    end
  end
end

-- A MAXLEN cut does not know what the groups have read: with groups, the
-- commit's retention trims instead.
if maxlen > 0 and redis.call('EXISTS', stream) == 1 and #redis.call('XINFO', 'GROUPS', stream) > 0 then
  maxlen = 0
end

local append
if maxlen > 0 and with_payload then
  append = function(pkey, epoch, op, payload)
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'pkey', pkey, 'epoch', epoch, 'variant', variant, 'op', op, 'payload', payload)
  end
elseif maxlen > 0 then
  append = function(pkey, epoch, op)
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'pkey', pkey, 'epoch', epoch, 'variant', variant, 'op', op)
  end
elseif with_payload then
  append = function(pkey, epoch, op, payload)
    redis.call('XADD', stream, '*', 'pkey', pkey, 'epoch', epoch, 'variant', variant, 'op', op, 'payload', payload)
  end
else
  append = function(pkey, epoch, op)
    redis.call('XADD', stream, '*', 'pkey', pkey, 'epoch', epoch, 'variant', variant, 'op', op)
  end
end

-- The keys emitted here: member m is scores[2m-1] (epoch), scores[2m]
-- (pkey) and fields[2m-1] (pkey), fields[2m] (digest); `member` finds a
-- key's m, so that its later version overwrites the earlier one.
local member, scores, fields, members = {}, {}, {}, 0
local emitted = 0
for r = 1, rows do
  local i = first_row + (r - 1) * 5
  local pkey, epoch, digest = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local m = member[pkey]
  local last
  if m then
    last = fields[2 * m]
  else
    last = stored[r]
  end
  if last ~= digest then
    if not m then
      members = members + 1
      m = members
      member[pkey] = m
      scores[2 * m] = pkey
      fields[2 * m - 1] = pkey
    end
    scores[2 * m - 1] = epoch
    fields[2 * m] = digest
    append(pkey, epoch, ARGV[i + 3], ARGV[i + 4])
    emitted = emitted + 1
  end
end

for from = 1, members, slice do
  local to = math.min(from + slice - 1, members)
  redis.call('ZADD', seen, unpack(scores, 2 * from - 1, 2 * to))
  redis.call('HSET', digests, unpack(fields, 2 * from - 1, 2 * to))
end

local writes
if emitted > 0 then
  writes = redis.call('HINCRBY', state, 'writes', 1)
else
  writes = tonumber(redis.call('HGET', state, 'writes') or '0')
end
if name ~= '' then
  redis.call('HSET', state, 'chunk', name)
end
if token and token > fenced_by then
  redis.call('SET', lease, token)
end
return {emitted, writes}
