-- One observation of a distinct value for one key, in one round trip.
--
-- This mirrors DistinctState::observe in ratelimit-core/src/distinct.rs step for step;
-- read that first. tests/distinct.rs runs both on the same histories and requires the
-- same observations.
--
-- KEYS[1]   the key's hash (`<prefix>nets:{<encoded key>}`)
-- ARGV[1]   now, in ms since the Unix epoch; "" to use the server's TIME
-- ARGV[2]   extra TTL in ms kept beyond idle_at (see redis.rs)
-- ARGV[3]   max: more than this many distinct values in the window flags the key
-- ARGV[4]   the window, in ms
-- ARGV[5]   the value observed
--
-- The hash holds "f" = flagged_until (ms, 0 if never flagged) and one field per value,
-- "v" .. value = when it was last seen (ms). At most max + 1 value fields are kept: the
-- values seen most recently, which is enough to tell exactly whether more than max were
-- seen in the window.
--
-- Returns, as strings: now, the number of distinct values in the window (at most
-- max + 1), flagged_until if the key is flagged now or "", and "1" if this observation
-- raised the flag, else "0".
--
-- Numbers: now < 2^52 and window < 2^48, so every sum here is an exact double.

local function fmt(x)
  return string.format('%.0f', x)
end

local key = KEYS[1]
local now
if ARGV[1] == '' then
  -- Reading TIME then writing needs effects replication: the default from Redis 5,
  -- asked for on older servers.
  if redis.replicate_commands then
    redis.replicate_commands()
  end
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local grace = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local window = tonumber(ARGV[4])
local field = 'v' .. ARGV[5]
local cap = max + 1

local all = redis.call('HGETALL', key)
local flagged_until = 0
local entries = {}
local mine = nil
for i = 1, #all, 2 do
  local f, v = all[i], tonumber(all[i + 1]) or 0
  if f == 'f' then
    flagged_until = v
  elseif string.sub(f, 1, 1) == 'v' then
    entries[#entries + 1] = { f = f, at = v }
    if f == field then
      mine = #entries
    end
  end
end
local was_flagged = now < flagged_until

local hdel = {}
if mine then
  -- Seen already: only its last-seen time moves (never backwards).
  if now > entries[mine].at then
    entries[mine].at = now
  end
else
  -- Out-of-window values can never count again.
  local kept = {}
  for _, e in ipairs(entries) do
    if e.at + window > now then
      kept[#kept + 1] = e
    else
      hdel[#hdel + 1] = e.f
    end
  end
  entries = kept
  -- Full (or the threshold was lowered): evict the values seen longest ago.
  while #entries >= cap do
    local oldest = 1
    for j = 2, #entries do
      if entries[j].at < entries[oldest].at then
        oldest = j
      end
    end
    hdel[#hdel + 1] = entries[oldest].f
    table.remove(entries, oldest)
  end
  entries[#entries + 1] = { f = field, at = now }
  mine = #entries
end

local distinct, newest = 0, 0
for _, e in ipairs(entries) do
  if e.at + window > now then
    distinct = distinct + 1
  end
  if e.at > newest then
    newest = e.at
  end
end
if distinct > max and now + window > flagged_until then
  flagged_until = now + window
end
local idle_at = math.max(flagged_until, newest + window)

if #hdel > 0 then
  redis.call('HDEL', key, unpack(hdel))
end
redis.call('HSET', key, field, fmt(entries[mine].at), 'f', fmt(flagged_until))
-- Forget the key once it is idle (plus the grace); capped at 2^50 ms.
local ttl = math.min(math.max(idle_at - now + grace, 1), 1125899906842624)
redis.call('PEXPIRE', key, fmt(ttl))

local flagged = now < flagged_until
return {
  fmt(now),
  tostring(distinct),
  flagged and fmt(flagged_until) or '',
  (flagged and not was_flagged) and '1' or '0',
}
