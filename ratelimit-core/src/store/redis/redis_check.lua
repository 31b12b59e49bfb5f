-- One rate-limit decision for one key, in one round trip.
--
-- This mirrors KeyState::apply in ratelimit-core/src/algorithm.rs step for step; read
-- that first. The conformance suite (tests/conformance.rs) runs both on the same
-- histories and requires identical decisions.
--
-- The file is a Redis function library without its first and last lines: the store
-- loads it with FUNCTION LOAD as a library (Redis 7 and later) and calls check() with
-- FCALL, and on a server without functions as a script whose last line is
-- `return check(KEYS, ARGV, true)`, called with EVALSHA (see script.rs). The same code
-- decides either way.
--
-- keys[1]   the key's hash
-- args[1]   "<acquire> <grace>": acquire is 1 (record if every limit admits) or 0
--           (peek); grace, the extra TTL in ms kept beyond idle_at
-- args[2]   now in ms since the Unix epoch, or empty for the server's TIME
-- args[3..] two per limit: "<id> <kind> <n> <w> <pb>", then the cost: counter id
--           (decimal u64), kind w (sliding window) or b (token bucket), count,
--           window (ms), precision (window) or burst (bucket); the cost in the
--           limit's unit (decimal u64)
--
-- The hash holds "i" = idle_at (ms, decimal) and one field per counter id:
--   window: "idx:count,idx:count" oldest first, idx = sub-window number mod 2^32
--   bucket: "level:last", level in unit*ms (decimal, may exceed 2^53), last in ms
--
-- Returns the index (0-based) of the first refusing limit or -1, its retry_after in ms
-- or "" for never, then used and remaining for each limit: integers, or decimal
-- strings where they come from the big-integer path.
--
-- Numbers. Lua numbers are doubles, exact for integers below 2^53. Timestamps (the
-- caller keeps now below 2^52), windows (< 2^48), counts and window slot sums (at most
-- 8192 slots of < 2^32) stay far below that, so the sliding window uses plain
-- arithmetic. A token bucket's level is in unit*ms and may reach 2^64, the sums and
-- products around it about 2^112. A bucket whose capacity (burst * window) is at
-- most 2^52, whose stored level is below 2^53 and whose last update is below 2^52
-- is decided in doubles: every value computed then is an integer below 2^53, or a
-- product past 2^53 that is only compared with a smaller value (rounding keeps the
-- comparison right). Any other bucket takes the exact multi-limb path (`big`), as
-- do an idle_at past 2^53 and a window's expiry or retry time past it (a slot far
-- in the future: `mul64`).

-- Cost. As a script, Redis runs the whole file on every call, so every closure it
-- defines is made anew each time, with its upvalues, and every table and string it
-- makes is garbage for Lua's collector; as a function library, the file runs once
-- and check() is called, so what lives at library level (the functions, the parsed
-- arguments, the slot array one_window() reuses) is made once. Either way most of the
-- CPU is in calls to C (string.find, string.format, tonumber, math.*: 600 to 3,000
-- instructions each, measured) and in tables made per call, not in arithmetic. So
-- the hot path (sliding windows, numbers below 2^53) avoids both where it can:
-- token buckets and the multi-limb integers live in slow(), made only by a call
-- that needs them; a tier of one sliding window (the usual case) is decided by
-- one_window(), on plain values without a table of its own (probe_window() and
-- record_window() take and return values, not a table's fields); floors and
-- minimums are arithmetic, not math.floor or math.min; a validated decimal is
-- converted with `+ 0` (one strtod; tonumber makes two); slots are printed with
-- string.format('%d:%d') rather than by concatenating numbers, which formats each
-- as a double ('%.14g') into a string of its own (the text is the same below 2^32).
-- Measured under callgrind, one window on keys holding one slot, the time passed by
-- the caller: 96,700 instructions per EVALSHA of the first version, 82,900 with
-- one_window(), 61,300 per FCALL with a working table per limit, 56,300 per FCALL of
-- this file (an empty function: 15,400; the HMGET: 9,900; the HSET: 6,000; reading
-- TIME adds about 6,500). The same file as a script costs 88,600: making its 14
-- closures (about 400 instructions each, more with their upvalues) and its tables
-- on every call.

-- Exact floor(a / d) for integers 0 <= a < 2^53, 1 <= d: the double quotient may be
-- one off after rounding, so fix it by checking the remainder. (Used by both parts.)
local function idiv(a, d)
  local q = a / d
  q = q - q % 1 -- floor, without the cost of calling math.floor
  if q * d > a then
    q = q - 1
  elseif (q + 1) * d <= a then
    q = q + 1
  end
  return q
end

-- The rarely needed part ------------------------------------------------------------

-- Made on the first call to slow() in this script run; returns the functions the
-- hot path calls for token buckets and numbers past 2^53.
local lib
local function slow()
  if lib then
    return lib
  end
  local TWO32 = 4294967296
  local TWO31 = 2147483648
  local TWO52 = 4503599627370496
  local TWO53 = 9007199254740992

  local function ceil_div(a, d)
    local q = idiv(a, d)
    if q * d < a then
      q = q + 1
    end
    return q
  end

  -- A decimal integer below 2^53 (concatenation would print 1e+15 past 14 digits).
  local function fmt(x)
    return string.format('%.0f', x)
  end

  -- Multi-limb unsigned integers ------------------------------------------------------
  -- Little-endian arrays of base-2^24 limbs, no leading zero limbs (zero is {0}). A
  -- limb product is below 2^48, so a product plus a limb plus a carry stays exact.
  -- bignum() defines them when a decision first needs them: most never do, and a
  -- script's functions are made anew on every call.
  local BASE = 16777216
  local big, trim, cmp, add, sub, mul, divmod, div_ceil, from_dec, to_dec, U64MAX

  local function bignum()
    if big then
      return
    end
    function big(x) -- from an integer double, 0 <= x < 2^53
      local r = {}
      repeat
        local l = x % BASE
        r[#r + 1] = l
        x = (x - l) / BASE
      until x == 0
      return r
    end

    function trim(a)
      while #a > 1 and a[#a] == 0 do
        a[#a] = nil
      end
      return a
    end

    function cmp(a, b)
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

    function add(a, b)
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
    function sub(a, b)
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

    function mul(a, b)
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
    function divmod(a, d)
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

    function div_ceil(a, d)
      local q, r = divmod(a, d)
      if r > 0 then
        q = add(q, {1})
      end
      return q
    end

    function from_dec(s)
      local r = {0}
      local i = 1
      local j = #s % 7
      if j == 0 then
        j = 7
      end
      while i <= #s do
        local chunk = string.sub(s, i, j)
        r = add(mul(r, big(10 ^ #chunk)), big(tonumber(chunk)))
        i, j = j + 1, j + 7
      end
      return r
    end

    function to_dec(a)
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
    U64MAX = {16777215, 16777215, 65535}
  end

  -- Values that are a double below 2^53 or, past that, a big clamped to 2^64 - 1 (a
  -- table: bignum() has run).
  local function as_big(v)
    return type(v) == 'table' and v or big(v)
  end

  local function mul64(a, b) -- a, b integer doubles below 2^53
    local r = a * b
    if r < TWO53 then
      return r
    end
    bignum()
    r = mul(big(a), big(b))
    return cmp(r, U64MAX) > 0 and U64MAX or r
  end

  local function vmax(a, b)
    if type(a) == 'number' and type(b) == 'number' then
      return math.max(a, b)
    end
    return cmp(as_big(a), as_big(b)) >= 0 and a or b
  end

  -- A stored decimal: a double if below 2^53 (exact then), else a big.
  local function stored(s, what)
    local x = string.find(s, '^%d+$') and tonumber(s)
    if not x then
      error('ratelimit: not a decimal integer in ' .. what .. ': ' .. s)
    end
    if x < TWO53 then
      return x
    end
    bignum()
    return from_dec(s)
  end

  -- Token bucket ----------------------------------------------------------------------

  local function probe_bucket(l, state, now)
    local n, w, cost = l.n, l.w, l.cost
    local level, last = 0, 0
    if state then
      level, last = string.match(state, '^(%d+):(%d+)$')
      if not level then
        error('ratelimit: bad bucket state: ' .. state)
      end
      level, last = stored(level, 'a bucket level'), tonumber(last)
    end
    l.last = last
    local cap = l.pb * w
    if cap <= TWO52 and type(level) == 'number' and last < TWO52 then
      -- Doubles: see "Numbers" above.
      l.fast = true
      local lvl = math.max(level - math.max(now - last, 0) * n, 0)
      local need = cost * w
      l.lvl, l.need = lvl, need
      l.admit = need <= cap and lvl <= cap - need
      l.retry = ''
      if need <= cap and not l.admit then
        l.retry = ceil_div(lvl - (cap - need), n)
      end
      l.used, l.rem = ceil_div(lvl, w), idiv(math.max(cap - lvl, 0), w)
      return
    end
    -- Exact multi-limb integers.
    l.fast = false
    bignum()
    local bcap, bw = mul(big(l.pb), big(w)), big(w)
    local lvl = sub(as_big(level), mul(big(math.max(now - last, 0)), big(n)))
    local need = mul(from_dec(l.cost_dec), bw)
    local total = add(lvl, need)
    l.lvl, l.need = lvl, need
    l.admit = cmp(total, bcap) <= 0
    l.retry = ''
    if not l.admit and cmp(need, bcap) <= 0 then
      l.retry = to_dec(div_ceil(sub(total, bcap), n))
    end
    l.used = to_dec(div_ceil(lvl, w))
    local rem = divmod(sub(bcap, lvl), w) -- at most burst, below 2^32
    l.rem = rem[1] + (rem[2] or 0) * BASE
  end

  -- Records cost (admitted, so level + cost * w <= burst * w <= 2^64 - 1); returns the
  -- new field value and when the bucket will be empty.
  local function record_bucket(l, now)
    local last = math.max(l.last, now)
    if l.fast then
      local new = l.lvl + l.need
      return fmt(new) .. ':' .. fmt(last), last + ceil_div(new, l.n)
    end
    local new = add(l.lvl, l.need)
    local expiry = add(big(last), div_ceil(new, l.n))
    if cmp(expiry, U64MAX) > 0 then
      expiry = U64MAX
    end
    return to_dec(new) .. ':' .. fmt(last), expiry
  end

  lib = {
    stored = stored,
    mul64 = mul64,
    vmax = vmax,
    probe_bucket = probe_bucket,
    record_bucket = record_bucket,
    to_dec = function(a)
      return to_dec(a)
    end,
    -- A window's retry time when the slot's end, x * sub_ms, is past 2^53.
    retry_past = function(x, sub_ms, now)
      local leaves_at = mul64(x, sub_ms)
      if type(leaves_at) == 'number' then
        return math.max(leaves_at - now, 0)
      end
      return to_dec(sub(leaves_at, big(now)))
    end,
  }
  return lib
end

-- Sliding window --------------------------------------------------------------------

-- Parses the counter (state, its stored text, or nil) of a window of w ms in p
-- sub-windows that admits n, and checks cost against it. A slot's age is its
-- sub-window's distance from now's, b - idx (both mod 2^32) as a signed 32-bit
-- number: negative means in the future (the clock stepped back). The slots go into
-- one flat array, sl (the one passed is reused, if any): position in the text,
-- count, age, for each in turn.
--
-- Returns used, remaining, whether cost is admitted, retry_after ('' for never, or a
-- decimal string past 2^53), and, for record_window: now's sub-window, the slot
-- array and the number of slots in it. Values in and out, not fields of a table:
-- the usual tier (one window) is decided without a table per call, which costs
-- about as much as the probe itself (measured).
local function probe_window(w, p, n, cost, state, now, sl)
  local TWO32 = 4294967296
  local sub_ms = w / p -- exact: the precision divides the window
  local b_abs = idiv(now, sub_ms)
  local b = b_abs % TWO32
  local len, used, retry = 0, 0, ''
  if state then
    -- string.find from the end of the last match, not gmatch, which makes a closure;
    -- the first slot's three entries come with the table.
    local pos, e, i, c = string.find(state, '(%d+):(%d+)')
    while pos do
      local a = (b - i) % TWO32 -- i: Lua converts the digits
      if a >= 2147483648 then
        a = a - TWO32
      end
      c = c + 0 -- one conversion (tonumber makes two)
      if sl then
        local k = len * 3
        sl[k + 1], sl[k + 2], sl[k + 3] = pos, c, a
      else
        sl = {pos, c, a}
      end
      len = len + 1
      if a <= p then
        used = used + c
      end
      if e == #state then
        break -- the last slot: no need to search again
      end
      pos, e, i, c = string.find(state, '(%d+):(%d+)', e + 1)
    end
    sl = sl or {}
  end
  local admit = used + cost <= n
  if not admit and cost <= n then
    -- Oldest first: when enough sub-windows have left the window to fit cost.
    local left = used
    for k = 0, (len - 1) * 3, 3 do
      local a = sl[k + 3]
      if a <= p then
        left = left - sl[k + 2]
        if left + cost <= n then
          local x = b_abs - a + p + 1
          local leaves_at = x * sub_ms
          if leaves_at < 9007199254740992 then
            retry = leaves_at > now and leaves_at - now or 0
          else
            retry = slow().retry_past(x, sub_ms, now)
          end
          break
        end
      end
    end
  end
  return used, used < n and n - used or 0, admit, retry, b_abs, sl, len
end

-- Records cost in the counter that probe_window() read (state, and what it
-- returned: b_abs, sl, len); returns the new field value and when the counter will
-- be empty.
local function record_window(w, p, cost, state, b_abs, sl, len)
  local TWO32 = 4294967296
  local b = b_abs % TWO32
  -- The kept slots (still in the window): m of them, the first at first, the newest
  -- at last; suffix: whether they are the stored ones from first on.
  local first, last, m, suffix = nil, nil, 0, true
  for k = 0, len - 1 do
    if sl[k * 3 + 3] <= p then
      m = m + 1
      first = first or k
      last = k
    elseif m > 0 then
      suffix = false
    end
  end
  local c = cost < TWO32 and cost or TWO32 - 1
  local newest, tail, merged = b_abs, '', nil
  if last and sl[last * 3 + 3] <= 0 then
    -- The current sub-window, or a later one if the clock stepped back.
    local a = sl[last * 3 + 3]
    newest = b_abs - a
    local sum = sl[last * 3 + 2] + c
    tail = string.format('%d:%d', (b - a) % TWO32, sum < TWO32 and sum or TWO32 - 1)
    merged = last
    m = m - 1
  elseif c > 0 then
    tail = string.format('%d:%d', b, c)
  end
  local sub_ms = w / p
  local x = newest + 1 + p
  local expiry = x * sub_ms
  if expiry >= 9007199254740992 then
    expiry = slow().mul64(x, sub_ms)
  end
  if m == 0 then
    return tail, expiry
  end
  local head
  if suffix then
    -- Reuse the stored text of the slots kept unchanged: first .. first + m - 1.
    local after = first + m
    head = string.sub(state, sl[first * 3 + 1], after < len and sl[after * 3 + 1] - 2 or -1)
  else
    local out, o = {}, 0
    for k = 0, len - 1 do
      if sl[k * 3 + 3] <= p and k ~= merged then
        o = o + 1
        out[o] = string.format('%d:%d', (b - sl[k * 3 + 3]) % TWO32, sl[k * 3 + 2])
      end
    end
    head = table.concat(out, ',')
  end
  return tail == '' and head or head .. ',' .. tail, expiry
end

-- The decision ----------------------------------------------------------------------

-- Parsed arguments, by kind and text. The flags ("<acquire> <grace>"), a limit
-- ("<id> <kind> <n> <w> <pb>") and most costs are the same text on every call of a
-- tier, so a function (FCALL), whose library-level values live as long as the
-- library, parses each once; a script (EVALSHA) starts every call with empty
-- tables. Emptied when they hold 1024 texts between them, so a caller sending ever
-- new texts cannot grow them without bound. A script, whose tables would not outlive
-- the call, keeps nothing (check()'s `once`): filling tables only to drop them cost
-- it more than the parsing.
local parsed, nparsed, keep = nil, 0, true

-- The value of `text` parsed by parse (which raises an error for a bad text), from
-- the table of its kind when it was parsed before.
local function parsed_as(kind, text, parse)
  local v = parsed and parsed[kind][text]
  if v then
    return v
  end
  v = parse(text)
  if keep then
    if not parsed or nparsed >= 1024 then
      parsed, nparsed = {flags = {}, limit = {}, cost = {}}, 0
    end
    parsed[kind][text], nparsed = v, nparsed + 1
  end
  return v
end

local function flags_of(text)
  local acquire, grace = string.match(text, '^([01]) (%d+)$')
  if not acquire then
    error('ratelimit: bad arguments: ' .. text)
  end
  return {acquire = acquire == '1', grace = tonumber(grace)}
end

local function limit_of(text)
  local id, kind, n, w, pb = string.match(text, '^(%d+) ([wb]) (%d+) (%d+) (%d+)$')
  if not id then
    error('ratelimit: bad limit argument: ' .. text)
  end
  return {id = id, bucket = kind == 'b', n = tonumber(n), w = tonumber(w), pb = tonumber(pb)}
end

local function cost_of(text)
  local c = string.find(text, '^%d+$') and text + 0
  if not c then
    error('ratelimit: bad cost argument: ' .. text)
  end
  return c
end

-- A limit's working state for one decision: its parsed argument, its cost (a double,
-- and the decimal text for the exact path), and what probing it found. Every field
-- set from a window's probe is listed, so the table is sized once (a bucket's probe
-- adds its own).
local function working(p, cost_text)
  return {
    id = p.id, bucket = p.bucket, n = p.n, w = p.w, pb = p.pb,
    cost = parsed_as('cost', cost_text, cost_of), cost_dec = cost_text,
    admit = false, used = 0, rem = 0, retry = '',
    state = false, b_abs = 0, sl = false, len = 0,
  }
end

-- The slot array of one_window(), which a function reuses from call to call instead
-- of making a new one: probe_window() sets it from the start and says how many slots
-- it holds, and nothing reads past that.
local slots

-- Sets the TTL that forgets the key once it is idle (plus the grace). Capped at 2^50
-- ms so the server accepts it; a key live longer than that is not a real case.
local function expire(key, idle, now, grace)
  local ttl = 1125899906842624
  if type(idle) == 'number' then
    local t = idle - now + grace
    if t < 1 then
      ttl = 1
    elseif t < ttl then
      ttl = t
    end
  end
  redis.call('PEXPIRE', key, string.format('%.0f', ttl))
end

-- One sliding-window limit, the usual tier, decided without the tables the general
-- path keeps for several limits (the same probe_window and record_window). Returns
-- nil, having written nothing, for what it leaves to the general path: a token
-- bucket, and numbers at or past 2^53.
local function one_window(key, acquire, now, grace, p, cost_text)
  if p.bucket then
    return nil
  end
  local vals = redis.call('HMGET', key, 'i', p.id)
  local idle_at = vals[1]
  if idle_at then
    idle_at = string.find(idle_at, '^%d+$') and idle_at + 0
    if not idle_at or idle_at >= 9007199254740992 then
      return nil
    end
  end
  local live = idle_at and now < idle_at
  local w, pb, cost = p.w, p.pb, parsed_as('cost', cost_text, cost_of)
  local state = live and vals[2] or nil
  local used, rem, admit, retry, b_abs, sl, len =
    probe_window(w, pb, p.n, cost, state, now, slots)
  slots = sl
  if type(retry) ~= 'number' and retry ~= '' then
    return nil
  end
  if not acquire or not admit then
    return {admit and -1 or 0, retry, used, rem}
  end
  local value, expiry = record_window(w, pb, cost, state, b_abs, sl, len)
  if type(expiry) ~= 'number' then
    return nil
  end
  local idle = live and idle_at or 0
  if expiry > idle then
    idle = expiry
  end
  if live and idle == idle_at then
    redis.call('HSET', key, p.id, value)
  else
    if idle_at and not live then
      redis.call('DEL', key)
    end
    redis.call('HSET', key, p.id, value, 'i', string.format('%.0f', idle))
    expire(key, idle, now, grace)
  end
  return {-1, '', used, rem - cost}
end

-- Any tier: every limit probed, then, if all admit and this is an acquire, every
-- limit recorded.
local function general(key, acquire, now, grace, args)
  local nl = (#args - 2) / 2
  local limits, fields = {}, {'i'}
  for j = 1, nl do
    local l = working(parsed_as('limit', args[j * 2 + 1], limit_of), args[j * 2 + 2])
    limits[j] = l
    fields[j + 1] = l.id
  end

  local vals = redis.call('HMGET', key, unpack(fields))
  local idle_at = vals[1]
  if idle_at then
    local x = string.find(idle_at, '^%d+$') and tonumber(idle_at)
    if not x then
      error('ratelimit: not a decimal integer in idle_at: ' .. idle_at)
    end
    if x < 9007199254740992 then
      idle_at = x
    else
      idle_at = slow().stored(idle_at, 'idle_at')
    end
  end
  -- A key with nothing recorded, or whose every counter has decayed, reads as empty.
  local live = idle_at and (type(idle_at) == 'table' or now < idle_at)

  local denied, retry = -1, ''
  for j = 1, nl do
    local l = limits[j]
    local state = live and vals[j + 1] or nil
    if l.bucket then
      slow().probe_bucket(l, state, now)
    else
      l.used, l.rem, l.admit, l.retry, l.b_abs, l.sl, l.len =
        probe_window(l.w, l.pb, l.n, l.cost, state, now, nil)
      l.state = state
    end
    if not l.admit and denied < 0 then
      denied, retry = j - 1, l.retry
    end
  end

  local record = acquire and denied < 0
  local out = {denied, retry}
  for j = 1, nl do
    local l = limits[j]
    out[j * 2 + 1] = l.used
    -- Recorded: every limit admitted cost, so cost <= rem < 2^32.
    out[j * 2 + 2] = record and l.rem - l.cost or l.rem
  end
  if not record then
    return out
  end

  local idle = 0
  if live then
    idle = idle_at
  elseif idle_at then
    -- Everything recorded has decayed: start over, as KeyState clears its counters.
    redis.call('DEL', key)
  end
  local seen = nl > 1 and {} -- a counter shared by two limits is charged once
  local hset, h = {}, 0
  for j = 1, nl do
    local l = limits[j]
    if not (seen and seen[l.id]) then
      if seen then
        seen[l.id] = true
      end
      local value, expiry
      if l.bucket then
        value, expiry = slow().record_bucket(l, now)
      else
        value, expiry = record_window(l.w, l.pb, l.cost, l.state, l.b_abs, l.sl, l.len)
      end
      hset[h + 1], hset[h + 2] = l.id, value
      h = h + 2
      if type(idle) == 'number' and type(expiry) == 'number' then
        if expiry > idle then
          idle = expiry
        end
      else
        idle = slow().vmax(idle, expiry)
      end
    end
  end
  -- idle_at and the TTL change only when idle_at moves (for a sliding window, once
  -- per sub-window): the TTL set then still ends at idle_at plus the grace.
  local moved = not live or idle ~= idle_at
  if moved then
    hset[h + 1] = 'i'
    hset[h + 2] = type(idle) == 'table' and slow().to_dec(idle) or string.format('%.0f', idle)
  end
  redis.call('HSET', key, unpack(hset))
  if moved then
    expire(key, idle, now, grace)
  end
  return out
end

-- The entry point: keys and args as in the header; `once` when called as a script.
local function check(keys, args, once)
  keep = not once
  local key = keys[1]
  if #args < 4 or #args % 2 ~= 0 then
    error('ratelimit: expected flags, time and (limit, cost) pairs, got ' .. #args .. ' arguments')
  end
  local flags = parsed_as('flags', args[1], flags_of)
  local now = args[2]
  if now == '' then
    -- Time from the server so every host agrees. A script that reads TIME and then
    -- writes needs effects replication: the default from Redis 5, asked for here on
    -- older servers (a no-op where it is the default; a function, Redis 7 and later,
    -- is always replicated by its effects, so it does not ask).
    if once and redis.replicate_commands then
      redis.replicate_commands()
    end
    local t = redis.call('TIME')
    local us = t[2] + 0
    now = t[1] * 1000 + (us - us % 1000) / 1000
  else
    now = string.find(now, '^%d+$') and now + 0
    if not now then
      error('ratelimit: bad time argument: ' .. args[2])
    end
  end
  if #args == 4 then
    local limit = parsed_as('limit', args[3], limit_of)
    local out = one_window(key, flags.acquire, now, flags.grace, limit, args[4])
    if out then
      return out
    end
  end
  return general(key, flags.acquire, now, flags.grace, args)
end
