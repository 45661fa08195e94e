
-- highwater commit (after lua/retention.lua): after the last chunk of a
-- cycle, atomically advance the watermark, trim what the next window can no
-- longer return, and apply the stream's retention.
--
-- W_new = max(W_old, candidate). The candidate is the database's now() read
-- at cycle start (time cursors) or the highest version seen (version
-- cursors), never a row's timestamp, so a row stamped in the future cannot
-- push the window past real changes.
--
-- Members of `seen` with score < ARGV[2] (and their digests) are removed, at
-- most ARGV[3] per call. The caller passes the start of the next window as
-- the database will be asked for it (W_new - lookback, floored to what the
-- bound parameter can carry, e.g. whole seconds), or lower: no later window
-- can return what is trimmed, so nothing trimmed is emitted twice; the
-- highest such bound is kept as `trimmed`, below which no window starts. The
-- caller repeats the call while it trims a full batch, so a large trim never
-- blocks Redis for long.
--
-- KEYS[1] state, KEYS[2] seen, KEYS[3] digest, KEYS[4] lease, KEYS[5] stream,
-- KEYS[6] the stream's dropped-entries hash (lua/retention.lua)
-- ARGV[1] candidate watermark ("" = keep the old one)
-- ARGV[2] trim below this epoch ("" = trim nothing)
-- ARGV[3] trim batch size
-- ARGV[4] "1" if the state hash must exist (the cycle started from it or
--         one of its chunks created it)
-- ARGV[5] the caller's lease value ("" = unfenced; "#<token>" for a
--         partition, as in lua/dedup.lua); a value that is not the
--         lease's current one fails with "HWFENCED <current value>" and
--         changes nothing (the fence, as in lua/dedup.lua)
-- ARGV[6] the cycle's last chunk ("" = no check): the chunk that must be
--         the last one applied (lua/dedup.lua ARGV[7]), else the commit
--         fails with "HWCHAIN <last applied>" and changes nothing. A
--         failover that rolled back the cycle's last chunks (the promoted
--         replica lacked them) would otherwise see the watermark advance
--         past rows that are on no stream.
-- ARGV[7] max_stream_length, ARGV[8] max_age in ms, ARGV[9]
--         hard_max_stream_length (each 0 = none): the stream's retention
-- ARGV[10..] field, value pairs recorded in the state hash (last cycle's figures)
--
-- Returns {watermark or false, trimmed, keys in seen, entries in the stream,
-- stream entries trimmed, 1 if the retention was cut short, the groups}
-- (the sizes and the groups, so that the agent's gauges cost no round trip
-- of their own; the groups as retain() gives them);
-- false, changing nothing, when the
-- state hash must exist but does not (Redis lost it during the cycle: a
-- commit would recreate it and hide the loss).

local state, seen, digests, lease, stream, dropped = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local candidate, below, batch = ARGV[1], ARGV[2], tonumber(ARGV[3])

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

if ARGV[6] ~= '' then
  local last = redis.call('HGET', state, 'chunk')
  if last ~= ARGV[6] then
    return redis.error_reply('HWCHAIN ' .. (last or ''))
  end
end

if token and token > fenced_by then
  redis.call('SET', lease, token)
end

local watermark = redis.call('HGET', state, 'watermark')
if candidate ~= '' and (not watermark or tonumber(candidate) > tonumber(watermark)) then
  watermark = candidate
  redis.call('HSET', state, 'watermark', watermark)
end

-- The figures in one HSET (a dozen fields: one command, not one each).
if #ARGV >= 11 then
  redis.call('HSET', state, unpack(ARGV, 10, #ARGV))
end

local trimmed = 0
if below ~= '' then
  local cut = '(' .. below
  local members = redis.call('ZRANGEBYSCORE', seen, '-inf', cut, 'LIMIT', 0, batch)
  trimmed = #members
  -- unpack() is limited by Lua's C stack: delete in slices.
  for first = 1, trimmed, 1000 do
    local last = math.min(first + 999, trimmed)
    redis.call('ZREM', seen, unpack(members, first, last))
    redis.call('HDEL', digests, unpack(members, first, last))
  end
end
-- The highest bound ever trimmed below: no later window starts before it
-- (src/window.rs), so nothing trimmed is read, and sent, again.
if below ~= '' then
  local floor = redis.call('HGET', state, 'trimmed')
  if not floor or tonumber(below) > tonumber(floor) then
    redis.call('HSET', state, 'trimmed', below)
  end
end
-- How many keys the dedup state tracks: a cycle that later finds the digest
-- hash empty while this is not zero knows Redis lost data.
local tracked = redis.call('ZCARD', seen)
redis.call('HSET', state, 'tracked', tracked)
local kept = retain(stream, dropped, tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), batch)
return {watermark or false, trimmed, tracked, redis.call('XLEN', stream), kept[1], kept[2], kept[3]}
