-- One observation of a user's baseline, in one round trip.
--
-- This mirrors BaselineState::roll and BaselineState::record in
-- ratelimit-core/src/baseline.rs step for step; read that first. tests/baseline.rs
-- runs both on the same histories and requires the same states. The judgement itself
-- (threshold, flag) is computed in Rust from the state this script returns.
--
-- KEYS[1]   the key's state (`<prefix>base:{<encoded key>}`), a 34-byte string:
--           slot u32, 7 x count u16, day u32, day_max u32, usual u32, since u32,
--           little-endian (struct format '<I4I2I2I2I2I2I2I2I4I4I4I4')
-- ARGV[1]   now, in ms since the Unix epoch; "" to use the server's TIME
-- ARGV[2]   messages accepted (0: only look)
-- ARGV[3]   the per-day decay factor, in 1/65536
-- ARGV[4]   the TTL to set when recording, in ms (when the state is sure to have
--           decayed to nothing, plus a grace: see baseline.rs)
-- ARGV[5]   "o" to observe, "c" to roll and clear the hour's counts (keeping the
--           history; the TTL stays: needs Redis 6 for SET KEEPTTL)
--
-- Returns, as integers: now, then the state rolled to now (slot, the 7 counts, day,
-- day_max, usual, since); for "c", 1 if the rolled hour had any count, else 0.
--
-- Numbers: now < 2^52, usual < 2^32 and the decay < 2^16, so every product here is an
-- exact double, and math.floor is integer division.

local FORMAT = '<I4I2I2I2I2I2I2I2I4I4I4I4'
local SLOT_MS = 600000
local DAY_MS = 86400000
local SLOTS = 7
local U32 = 4294967295

local key = KEYS[1]
local raw = redis.call('GET', key)
local s = { slot = 0, counts = { 0, 0, 0, 0, 0, 0, 0 }, day = 0, day_max = 0, usual = 0, since = 0 }
if raw then
  if string.len(raw) ~= 34 then
    return redis.error_reply('baseline state of ' .. key .. ' has ' .. string.len(raw) .. ' bytes, not 34')
  end
  local v = { struct.unpack(FORMAT, raw) }
  s.slot = v[1]
  for i = 1, SLOTS do
    s.counts[i] = v[1 + i]
  end
  s.day, s.day_max, s.usual, s.since = v[9], v[10], v[11], v[12]
end

local now
if ARGV[1] == '' then
  if redis.replicate_commands then
    redis.replicate_commands()
  end
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local accepted = tonumber(ARGV[2])
local decay = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])

-- roll
local slot = math.min(math.floor(now / SLOT_MS), U32)
if slot > s.slot then
  local shift = slot - s.slot
  for i = 1, SLOTS do
    local j = i + shift
    if j <= SLOTS then
      s.counts[i] = s.counts[j]
    else
      s.counts[i] = 0
    end
  end
  s.slot = slot
end
local day = math.min(math.floor(now / DAY_MS), U32)
if day > s.day then
  local days = day - s.day
  local m = s.day_max
  while days > 0 and (s.usual > 0 or m > 0) do
    -- step(usual, m, decay)
    local decayed = math.floor(s.usual * decay / 65536)
    local grown = 2 * decayed + 512
    local seen = m * 256
    s.usual = math.min(math.max(decayed, math.min(seen, grown)), U32)
    m = 0
    days = days - 1
  end
  s.day = day
  s.day_max = 0
  if s.usual == 0 then
    s.since = 0
  end
end

if ARGV[5] == 'c' then
  -- BaselineState::clear_hour, on the rolled state; the TTL stays.
  if not raw then
    return 0
  end
  local had = 0
  for i = 1, SLOTS do
    if s.counts[i] > 0 then
      had = 1
    end
    s.counts[i] = 0
  end
  local c = s.counts
  redis.call('SET', key,
    struct.pack(FORMAT, s.slot, c[1], c[2], c[3], c[4], c[5], c[6], c[7], s.day, s.day_max, s.usual, s.since),
    'KEEPTTL')
  return had
end

-- record
if accepted > 0 then
  s.counts[SLOTS] = math.min(s.counts[SLOTS] + accepted, 65535)
  local hour = 0
  for i = 1, SLOTS do
    hour = hour + s.counts[i]
  end
  if hour > s.day_max then
    s.day_max = hour
  end
  if s.since == 0 then
    s.since = math.max(math.min(math.floor(now / 1000), U32), 1)
  end
  local c = s.counts
  redis.call('SET', key,
    struct.pack(FORMAT, s.slot, c[1], c[2], c[3], c[4], c[5], c[6], c[7], s.day, s.day_max, s.usual, s.since),
    'PX', string.format('%.0f', ttl))
end

local out = { now, s.slot }
for i = 1, SLOTS do
  out[#out + 1] = s.counts[i]
end
out[#out + 1] = s.day
out[#out + 1] = s.day_max
out[#out + 1] = s.usual
out[#out + 1] = s.since
return out
