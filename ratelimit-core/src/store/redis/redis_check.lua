-- One rate-limit decision for one key, in one round trip.
--
-- This mirrors KeyState::apply in ratelimit-core/src/algorithm.rs step for step; read
-- that first. The conformance suite (tests/conformance.rs) runs both on the same
-- histories and requires identical decisions.
--
-- KEYS[1]   the key's hash
-- ARGV[1]   "1": acquire (record if every limit admits); "0": peek
-- ARGV[2]   now, in ms since the Unix epoch; "" to use the server's TIME
-- ARGV[3]   extra TTL in ms kept beyond idle_at (see redis.rs)
-- ARGV[4]   k, the number of limits; then 6 values per limit:
--             counter id (decimal u64), "w" (sliding window) or "b" (token bucket),
--             count n, window w (ms), precision p (window) or burst (bucket),
--             cost in the limit's unit (decimal u64)
--
-- The hash holds "i" = idle_at (ms, decimal) and one field per counter id:
--   window: "idx:count,idx:count" oldest first, idx = sub-window number mod 2^32
--   bucket: "level:last", level in unit*ms (decimal, may exceed 2^53), last in ms
--
-- Returns, as strings: now, the index (0-based) of the first refusing limit or -1,
-- its retry_after in ms or "" for never, then used and remaining for each limit.
--
-- Numbers. Lua numbers are doubles, exact for integers below 2^53. Timestamps (the
-- caller keeps now below 2^52), windows (< 2^48), counts and window slot sums (at most
-- 8192 slots of < 2^32) stay far below that, so the sliding window uses plain
-- arithmetic. A token bucket's level is in unit*ms and reaches 2^64, and the sums and
-- products around it about 2^112, so the bucket uses exact multi-limb integers (`big`
-- below) and its level is stored as a decimal string.

local TWO32 = 4294967296
local TWO31 = 2147483648
local U32MAX = 4294967295

-- Exact floor(a / d) for integers 0 <= a < 2^53, 1 <= d: the double quotient may be
-- one off after rounding, so fix it by checking the remainder.
local function idiv(a, d)
  local q = math.floor(a / d)
  if q * d > a then
    q = q - 1
  elseif (q + 1) * d <= a then
    q = q + 1
  end
  return q
end

local function fmt(x)
  return string.format('%.0f', x)
end

-- Multi-limb unsigned integers: little-endian arrays of base-2^24 limbs, no leading
-- zero limbs (zero is {0}). A limb product is below 2^48, so a product plus a limb
-- plus a carry stays exact in a double.
local BASE = 16777216

local function big(x) -- from an integer double, 0 <= x < 2^53
  local r = {}
  repeat
    local l = x % BASE
    r[#r + 1] = l
    x = (x - l) / BASE
  until x == 0
  return r
end

local function trim(a)
  while #a > 1 and a[#a] == 0 do
    a[#a] = nil
  end
  return a
end

local function cmp(a, b)
  if #a ~= #b then
    return #a < #b and -1 or 1
  end
  for i = #a, 1, -1 do
    if a[i] ~= b[i] then
      return a[i] < b[i] and -1 or 1
    end
  end
  return 0
end

local function add(a, b)
  local r, carry = {}, 0
  for i = 1, math.max(#a, #b) do
    local s = (a[i] or 0) + (b[i] or 0) + carry
    if s >= BASE then
      r[i], carry = s - BASE, 1
    else
      r[i], carry = s, 0
    end
  end
  if carry > 0 then
    r[#r + 1] = carry
  end
  return r
end

-- a - b, saturating at zero (as Rust's saturating_sub).
local function sub(a, b)
  if cmp(a, b) <= 0 then
    return {0}
  end
  local r, borrow = {}, 0
  for i = 1, #a do
    local s = a[i] - (b[i] or 0) - borrow
    if s < 0 then
      r[i], borrow = s + BASE, 1
    else
      r[i], borrow = s, 0
    end
  end
  return trim(r)
end

local function mul(a, b)
  local r = {}
  for i = 1, #a + #b do
    r[i] = 0
  end
  for i = 1, #a do
    local carry = 0
    for j = 1, #b do
      local t = r[i + j - 1] + a[i] * b[j] + carry
      local lo = t % BASE
      r[i + j - 1], carry = lo, (t - lo) / BASE
    end
    local k = i + #b
    while carry > 0 do
      local t = r[k] + carry
      local lo = t % BASE
      r[k], carry = lo, (t - lo) / BASE
      k = k + 1
    end
  end
  return trim(r)
end

-- Long division by an integer double 1 <= d <= 2^48, four bits at a time: the partial
-- remainder stays below 16 * d <= 2^52. Returns the quotient (big) and remainder.
local NIBBLE = {1048576, 65536, 4096, 256, 16, 1}
local function divmod(a, d)
  local q, r = {}, 0
  for i = #a, 1, -1 do
    local limb, ql = a[i], 0
    for _, p in ipairs(NIBBLE) do
      r = r * 16 + math.floor(limb / p) % 16
      local qd = idiv(r, d)
      r = r - qd * d
      ql = ql * 16 + qd
    end
    q[i] = ql
  end
  return trim(q), r
end

local function div_floor(a, d)
  local q = divmod(a, d)
  return q
end

local function div_ceil(a, d)
  local q, r = divmod(a, d)
  if r > 0 then
    q = add(q, {1})
  end
  return q
end

local function from_dec(s)
  if type(s) ~= 'string' or not string.find(s, '^%d+$') then
    error('ratelimit: not a decimal integer: ' .. tostring(s))
  end
  local r = {0}
  local i = 1
  local first = #s % 7
  if first == 0 then
    first = 7
  end
  local j = first
  while i <= #s do
    local chunk = string.sub(s, i, j)
    r = add(mul(r, big(10 ^ #chunk)), big(tonumber(chunk)))
    i, j = j + 1, j + 7
  end
  return r
end

local function to_dec(a)
  local parts = {}
  repeat
    local r
    a, r = divmod(a, 10000000)
    table.insert(parts, 1, r)
  until #a == 1 and a[1] == 0
  local s = fmt(parts[1])
  for i = 2, #parts do
    s = s .. string.format('%07.0f', parts[i])
  end
  return s
end

-- 2^64 - 1 = (2^16 - 1) * 2^48 + (2^24 - 1) * 2^24 + (2^24 - 1)
local U64MAX = {16777215, 16777215, 65535}

-- Sliding window ------------------------------------------------------------------

-- Age of sub-window idx seen from sub-window b (both mod 2^32), as a signed 32-bit
-- difference: negative means in the future (the clock stepped back).
local function age(b, idx)
  local d = (b - idx) % TWO32
  if d >= TWO31 then
    d = d - TWO32
  end
  return d
end

local function parse_slots(s)
  local slots = {}
  if s then
    for idx, count in string.gmatch(s, '(%d+):(%d+)') do
      slots[#slots + 1] = {tonumber(idx), tonumber(count)}
    end
  end
  return slots
end

local function probe_window(n, p, sub_ms, slots, cost, now)
  local b_abs = idiv(now, sub_ms)
  local b = b_abs % TWO32
  local used = 0
  for _, s in ipairs(slots) do
    if age(b, s[1]) <= p then
      used = used + s[2]
    end
  end
  local admit = used + cost <= n
  local retry = ''
  if not admit and cost <= n then
    -- Oldest first: when enough sub-windows have left the window to fit cost.
    local left = used
    for _, s in ipairs(slots) do
      local a = age(b, s[1])
      if a <= p then
        left = left - s[2]
        if left + cost <= n then
          local leaves_at = (b_abs - a + p + 1) * sub_ms
          retry = fmt(math.max(leaves_at - now, 0))
          break
        end
      end
    end
  end
  return {
    used = fmt(used),
    admit = admit,
    retry = retry,
    rem_if = fmt(math.max(n - (used + cost), 0)),
    rem_now = fmt(math.max(n - used, 0)),
  }
end

-- Records cost; returns the new field value and when the counter will be empty.
local function record_window(p, sub_ms, slots, cost, now)
  local b_abs = idiv(now, sub_ms)
  local b = b_abs % TWO32
  local kept = {}
  for _, s in ipairs(slots) do
    if age(b, s[1]) <= p then
      kept[#kept + 1] = s
    end
  end
  local c = math.min(cost, U32MAX)
  local last = kept[#kept]
  local expiry
  if last and age(b, last[1]) <= 0 then
    -- The current sub-window, or a later one if the clock stepped back.
    last[2] = math.min(last[2] + c, U32MAX)
    local newest = b_abs - age(b, last[1])
    expiry = (newest + 1 + p) * sub_ms
  else
    if c > 0 then
      kept[#kept + 1] = {b, c}
    end
    expiry = (b_abs + 1 + p) * sub_ms
  end
  local out = {}
  for i, s in ipairs(kept) do
    out[i] = fmt(s[1]) .. ':' .. fmt(s[2])
  end
  return table.concat(out, ','), big(expiry)
end

-- Token bucket --------------------------------------------------------------------

local function parse_bucket(s)
  if not s then
    return {0}, 0
  end
  local level, last = string.match(s, '^(%d+):(%d+)$')
  if not level then
    error('ratelimit: bad bucket state: ' .. s)
  end
  return from_dec(level), tonumber(last)
end

-- The level at now after draining n per ms since last (never below zero).
local function drained(level, last, n, now)
  return sub(level, mul(big(math.max(now - last, 0)), big(n)))
end

local function probe_bucket(n, w, burst, level, last, cost, now)
  local cap = mul(big(burst), big(w))
  local lvl = drained(level, last, n, now)
  local need = mul(cost, big(w))
  local total = add(lvl, need)
  local admit = cmp(total, cap) <= 0
  local retry = ''
  if not admit and cmp(need, cap) <= 0 then
    retry = to_dec(div_ceil(sub(total, cap), n))
  end
  return {
    used = to_dec(div_ceil(lvl, w)),
    admit = admit,
    retry = retry,
    rem_if = to_dec(div_floor(sub(cap, total), w)),
    rem_now = to_dec(div_floor(sub(cap, lvl), w)),
  }
end

local function record_bucket(n, w, level, last, cost, now)
  local new = add(drained(level, last, n, now), mul(cost, big(w)))
  if cmp(new, U64MAX) > 0 then
    new = U64MAX
  end
  last = math.max(last, now)
  local expiry = add(big(last), div_ceil(new, n))
  if cmp(expiry, U64MAX) > 0 then
    expiry = U64MAX
  end
  return to_dec(new) .. ':' .. fmt(last), expiry
end

-- The decision --------------------------------------------------------------------

local key = KEYS[1]
local acquire = ARGV[1] == '1'
local now
if ARGV[2] == '' then
  -- Time from the server so every host agrees. A script that reads TIME and then
  -- writes needs effects replication: the default from Redis 5, asked for here on
  -- older servers (it is a no-op where it is the default).
  if redis.replicate_commands then
    redis.replicate_commands()
  end
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[2])
end
local grace = tonumber(ARGV[3])
local k = tonumber(ARGV[4])

local limits = {}
local fields = {'i'}
for j = 1, k do
  local o = 4 + (j - 1) * 6
  local l = {
    id = ARGV[o + 1],
    bucket = ARGV[o + 2] == 'b',
    n = tonumber(ARGV[o + 3]),
    w = tonumber(ARGV[o + 4]),
    pb = tonumber(ARGV[o + 5]),
    cost = ARGV[o + 6],
  }
  limits[j] = l
  fields[j + 1] = l.id
end

local vals = redis.call('HMGET', key, unpack(fields))
local idle_at = vals[1]
-- A key with nothing recorded, or whose every counter has decayed, reads as empty.
local live = idle_at and now < tonumber(idle_at)

local probes = {}
local denied, retry = -1, ''
for j, l in ipairs(limits) do
  local state = live and vals[j + 1] or nil
  local pr
  if l.bucket then
    local level, last = parse_bucket(state)
    pr = probe_bucket(l.n, l.w, l.pb, level, last, from_dec(l.cost), now)
  else
    pr = probe_window(l.n, l.pb, l.w / l.pb, parse_slots(state), tonumber(l.cost), now)
  end
  if not pr.admit and denied < 0 then
    denied, retry = j - 1, pr.retry
  end
  probes[j] = pr
end

local record = acquire and denied < 0
local out = {fmt(now), tostring(denied), retry}
for j, pr in ipairs(probes) do
  out[#out + 1] = pr.used
  out[#out + 1] = record and pr.rem_if or pr.rem_now
end

if record then
  local idle
  if live then
    idle = from_dec(idle_at)
  else
    -- Everything recorded has decayed: start over, as KeyState clears its counters.
    redis.call('DEL', key)
    idle = {0}
  end
  local seen, hset = {}, {}
  for j, l in ipairs(limits) do
    if not seen[l.id] then -- a counter shared by two limits is charged once
      seen[l.id] = true
      local state = live and vals[j + 1] or nil
      local value, expiry
      if l.bucket then
        local level, last = parse_bucket(state)
        value, expiry = record_bucket(l.n, l.w, level, last, from_dec(l.cost), now)
      else
        value, expiry = record_window(l.pb, l.w / l.pb, parse_slots(state), tonumber(l.cost), now)
      end
      hset[#hset + 1] = l.id
      hset[#hset + 1] = value
      if cmp(expiry, idle) > 0 then
        idle = expiry
      end
    end
  end
  local idle_dec = to_dec(idle)
  hset[#hset + 1] = 'i'
  hset[#hset + 1] = idle_dec
  redis.call('HSET', key, unpack(hset))
  -- Forget the key once it is idle (plus the grace). Capped at 2^50 ms so the server
  -- accepts it; a key that would stay live longer than that is not a real case.
  local ttl = math.min(math.max(tonumber(idle_dec) - now + grace, 1), 1125899906842624)
  redis.call('PEXPIRE', key, fmt(ttl))
end

return out
