-- highwater retention: how much of a stream to keep, and what its consumer
-- groups have left to read. Prepended to lua/commit.lua (once per cycle)
-- and to lua/retain.lua (while polling is paused); both end in a call of
-- retain().
--
-- Without consumer groups, the stream keeps its newest `max_len` entries
-- (MAXLEN ~, as every XADD does) and none older than `max_age_ms`.
--
-- With consumer groups, an entry goes only once every group has been
-- delivered it and has acknowledged it: per group, everything below its
-- oldest pending entry (when it has one) and up to its last-delivered id;
-- the lowest of those over the groups is the safe point. Below the safe
-- point, `max_len` and `max_age_ms` decide, exactly, what goes.
--
-- The hard cap `hard_len` (0 = none) is the one rule that ignores the
-- groups: beyond it the oldest entries go, read or not, and every dropped
-- entry a group had not acknowledged (pending, or not yet delivered) is
-- counted for that group, in the return value and in the hash `dropped`.
--
-- Stream ids compare as ids: milliseconds, then sequence, each a decimal
-- number (compared by length, then digit by digit: exact beyond 2^53).
--
-- Work per call is bounded: each cut removes at most `batch` entries and
-- `more` says a cut was cut short, so the caller calls again.

-- a < b for decimal strings without leading zeros.
local function num_less(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end

local function split_id(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms or id, seq or '0'
end

local function id_less(a, b)
  local am, as = split_id(a)
  local bm, bs = split_id(b)
  if am ~= bm then
    return num_less(am, bm)
  end
  return num_less(as, bs)
end

-- A decimal string plus one.
local function increment(number)
  local digits = {}
  for i = 1, #number do
    digits[i] = string.byte(number, i) - 48
  end
  local i = #digits
  while i > 0 and digits[i] == 9 do
    digits[i] = 0
    i = i - 1
  end
  if i == 0 then
    table.insert(digits, 1, 1)
  else
    digits[i] = digits[i] + 1
  end
  for j = 1, #digits do
    digits[j] = string.char(digits[j] + 48)
  end
  return table.concat(digits)
end

-- The smallest id after `id`: the sequence plus one, or the next
-- millisecond's first id when the sequence is at its maximum (2^64 - 1).
local function next_id(id)
  local ms, seq = split_id(id)
  if seq == '18446744073709551615' then
    return increment(ms) .. '-0'
  end
  return ms .. '-' .. increment(seq)
end

-- Removes the oldest entries below `bound` (an id), at most `limit` of them,
-- exactly: returns how many went, and whether entries below `bound` remain.
local function cut_below(stream, bound, limit)
  if limit <= 0 then
    return 0, false
  end
  local entries = redis.call('XRANGE', stream, '-', '(' .. bound, 'COUNT', limit + 1)
  if #entries == 0 then
    return 0, false
  end
  if #entries <= limit then
    redis.call('XTRIM', stream, 'MINID', '=', bound)
    return #entries, false
  end
  redis.call('XTRIM', stream, 'MINID', '=', entries[limit + 1][1])
  return limit, true
end

-- Returns {trimmed, more, groups}: entries removed, 1 if a cut was cut
-- short, and per group {name, lag (-1: unknown), pending, age of the oldest
-- pending entry in ms (-1: none), consumers, last-delivered id, entries
-- dropped by the hard cap in this call that it had not acknowledged}.
local function retain(stream, dropped, max_len, max_age_ms, hard_len, batch)
  if redis.call('TYPE', stream).ok ~= 'stream' then
    return {0, 0, {}}
  end
  local time = redis.call('TIME')
  local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

  local groups = {}
  local safe = nil
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local g = {}
    for i = 1, #info, 2 do
      g[info[i]] = info[i + 1]
    end
    local oldest = nil
    if tonumber(g['pending']) > 0 then
      oldest = redis.call('XPENDING', stream, g['name'])[2]
    end
    local group_safe = oldest or next_id(g['last-delivered-id'])
    if not safe or id_less(group_safe, safe) then
      safe = group_safe
    end
    local age = -1
    if oldest then
      age = math.max(0, now_ms - tonumber((split_id(oldest))))
    end
    groups[#groups + 1] = {
      g['name'], g['lag'] or -1, g['pending'], age, g['consumers'],
      g['last-delivered-id'], 0,
    }
  end

  local trimmed, more = 0, false
  if max_age_ms > 0 then
    local bound = string.format('%d', math.max(0, now_ms - max_age_ms)) .. '-0'
    if safe and id_less(safe, bound) then
      bound = safe
    end
    local n, short = cut_below(stream, bound, batch)
    trimmed, more = trimmed + n, more or short
  end
  local length = redis.call('XLEN', stream)
  if max_len > 0 and length > max_len then
    if not safe then
      trimmed = trimmed + redis.call('XTRIM', stream, 'MAXLEN', '~', max_len)
    else
      local want = length - max_len
      local n, short = cut_below(stream, safe, math.min(want, batch))
      trimmed, more = trimmed + n, more or (short and want > batch)
    end
    length = redis.call('XLEN', stream)
  end

  if hard_len > 0 and length > hard_len then
    local want = length - hard_len
    local n = math.min(want, batch)
    local entries = redis.call('XRANGE', stream, '-', '+', 'COUNT', n + 1)
    local first, last = entries[1][1], entries[n][1]
    for _, g in ipairs(groups) do
      -- Not acknowledged: pending (in the PEL) or not yet delivered.
      local unacked = #redis.call('XPENDING', stream, g[1], first, last, n)
      local delivered = g[6]
      for i = n, 1, -1 do
        if not id_less(delivered, entries[i][1]) then
          break
        end
        unacked = unacked + 1
      end
      if unacked > 0 then
        g[7] = unacked
        redis.call('HINCRBY', dropped, g[1], unacked)
      end
    end
    redis.call('XTRIM', stream, 'MINID', '=', entries[n + 1][1])
    trimmed, more = trimmed + n, more or want > batch
  end
  return {trimmed, more and 1 or 0, groups}
end
