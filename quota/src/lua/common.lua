-- Shared by every script; the clock prelude before it defines `now` (ms).
--
-- Data layout (all keys share the `{tg}` hash tag, one Cluster slot):
--   tg:{tg}:b:<bucket id>  hash  k refill kind (1 per-minute, 2 day, 3 month)
--                                 v unleased balance, per-minute ('%.17g')
--                                 t stamp of v (ms)
--                                 w window start (calendar, ms)
--                                 u used in window w (calendar, integer)
--                                 l sum of outstanding leases (integer)
--                                 x earliest lease reclaim time (ms; 0 = none)
--   tg:{tg}:r:<bucket id>  hash  replica -> lease record (see encode)
--
-- Lua replies and tostring keep 14 significant digits: every number leaves
-- a script through fmt (17 digits, exact for a double) or int.

local PER_MINUTE, DAY, MONTH = 1, 2, 3
local DAY_MS = 86400000
-- A lease record that holds nothing and has not synced for this long is
-- dropped: a replica coming back later is a new replica whose consumption
-- is subtracted as debt, which is what its record would have said anyway.
local RECORD_KEEP_MS = 60000

local function fmt(x) return string.format('%.17g', x) end
local function int(x) return string.format('%d', x) end
-- Floor division on doubles: exact for the integers used here (< 2^53).
local function fdiv(a, b) return math.floor(a / b) end

-- Howard Hinnant's civil-date algorithms, as core/src/time.rs has them.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = fdiv(y, 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = fdiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + fdiv(yoe, 4) - fdiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = fdiv(z, 146097)
  local doe = z - era * 146097
  local yoe = fdiv(doe - fdiv(doe, 1460) + fdiv(doe, 36524) - fdiv(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + fdiv(yoe, 4) - fdiv(yoe, 100))
  local mp = fdiv(5 * doy + 2, 153)
  local d = doy - fdiv(153 * mp + 2, 5) + 1
  local m
  if mp < 10 then m = mp + 3 else m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function days_in_month(y, m)
  if m == 2 then
    if (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0 then return 29 end
    return 28
  end
  if m == 4 or m == 6 or m == 9 or m == 11 then return 30 end
  return 31
end

-- [start, end) in ms of the day or month containing t, in a zone off_min
-- minutes east of UTC.
local function window(kind, t, off_min)
  local off = off_min * 60000
  local lt = t + off
  if kind == DAY then
    local start = fdiv(lt, DAY_MS) * DAY_MS - off
    return start, start + DAY_MS
  end
  local y, m = civil_from_days(fdiv(lt, DAY_MS))
  local start = days_from_civil(y, m, 1) * DAY_MS - off
  return start, start + days_in_month(y, m) * DAY_MS
end

-- A replica's lease record: seq of its last sync, outstanding lease g,
-- expiry e, reclaim time rc, window w it was granted in (0 per-minute),
-- last sync a, and the answer given (granted g0, remaining, reset) so a
-- retried sync gets the same grant back.
local function encode(r)
  return table.concat({fmt(r.s), int(r.g), int(r.e), int(r.rc), int(r.w), int(r.a),
    int(r.g0), fmt(r.rem), int(r.reset)}, ' ')
end

local function decode(str)
  local f = {}
  for p in string.gmatch(str, '%S+') do f[#f + 1] = tonumber(p) end
  return {s = f[1], g = f[2], e = f[3], rc = f[4], w = f[5], a = f[6], g0 = f[7],
    rem = f[8], reset = f[9]}
end

-- A lease counts in the bucket only for the window it was granted in: a
-- new calendar window starts with no leases.
local function lease_live(s, rec)
  return s.kind == PER_MINUTE or rec.w == s.ws
end

-- Returns leases whose holders missed their expiry by the margin to the
-- unleased balance (a replica reporting later has its consumption
-- subtracted then, as debt), drops stale records, and recomputes x.
local function reclaim(s)
  local all = redis.call('HGETALL', s.rkey)
  local next_x = 0
  for i = 1, #all, 2 do
    local rec = decode(all[i + 1])
    if rec.g > 0 and lease_live(s, rec) then
      if now >= rec.rc then
        s.l = s.l - rec.g
        if s.kind == PER_MINUTE then s.v = s.v + rec.g end
        rec.g = 0
        redis.call('HSET', s.rkey, all[i], encode(rec))
      elseif next_x == 0 or rec.rc < next_x then
        next_x = rec.rc
      end
    elseif now - rec.a > RECORD_KEEP_MS then
      redis.call('HDEL', s.rkey, all[i])
    end
  end
  s.x = next_x
end

-- A bucket brought up to `now`: refilled (per-minute, capped at the
-- capacity minus the outstanding leases) or in its current window
-- (calendar). `scan` forces the lease scan; otherwise it runs when the
-- earliest reclaim time has come. Every caller saves the state afterwards
-- (the scan may already have written lease records).
local function load(bkey, rkey, kind, limit, off, scan)
  local f = redis.call('HMGET', bkey, 'k', 'v', 't', 'w', 'u', 'l', 'x')
  local s = {bkey = bkey, rkey = rkey, kind = kind, limit = limit, off = off, l = 0, x = 0}
  local same = tonumber(f[1]) == kind
  if kind == PER_MINUTE then
    if same then
      s.l, s.x = tonumber(f[6]), tonumber(f[7])
      local v, t = tonumber(f[2]), tonumber(f[3])
      -- After a failover Redis TIME may be behind the stamp: never refill
      -- backwards, and keep the later stamp so no interval counts twice.
      s.v = v + math.max(now - t, 0) * limit / 60000
      s.t = math.max(t, now)
    else
      s.v, s.t = limit, now
    end
    -- Refill stops at the capacity minus what replicas hold; a lowered
    -- limit clamps the balance here, on read, as the local meter does.
    s.v = math.min(s.v, limit - s.l)
  else
    s.ws, s.we = window(kind, now, off)
    if same and tonumber(f[4]) == s.ws then
      s.u, s.l, s.x = tonumber(f[5]), tonumber(f[6]), tonumber(f[7])
    else
      -- A new window: nothing used, and the old window's leases are void.
      s.u = 0
    end
  end
  if not same then
    -- A fresh bucket (first use, expired, or another refill kind): old
    -- lease records describe a state that no longer exists.
    redis.call('DEL', rkey)
  end
  if scan or (s.x > 0 and now >= s.x) then reclaim(s) end
  return s
end

-- Writes a bucket back with a TTL: a per-minute bucket lives until it is
-- full again, a calendar one until its window ends, each plus keep_ms
-- (longer than any lease's reclaim time), so idle buckets leave Redis.
local function save(s, keep_ms)
  local ttl
  if s.kind == PER_MINUTE then
    redis.call('HSET', s.bkey, 'k', int(s.kind), 'v', fmt(s.v), 't', int(s.t), 'l', int(s.l),
      'x', int(s.x))
    ttl = math.ceil(math.max(s.limit - s.v, 0) * 60000 / s.limit) + keep_ms
  else
    redis.call('HSET', s.bkey, 'k', int(s.kind), 'w', int(s.ws), 'u', int(s.u), 'l', int(s.l),
      'x', int(s.x))
    ttl = s.we - now + keep_ms
  end
  redis.call('PEXPIRE', s.bkey, int(ttl))
  redis.call('PEXPIRE', s.rkey, int(ttl))
end

-- What a per-minute request needs in the unleased balance: its amount, or,
-- when it is larger than the unleased capacity (limit - leases), that
-- whole capacity. A request larger than the bucket passes a full bucket
-- and leaves debt instead of waiting forever, as in the local meter; here
-- "full" is what the replicas' leases leave.
local function need(s, amount)
  local room = s.limit - s.l
  if amount > room and room > 0 then return room end
  return amount
end

-- Per-minute: the unleased balance covers the need. Calendar: something is
-- left of the window (the request's real size is known only at the end).
local function fits(s, amount)
  if amount <= 0 then return true end
  if s.kind == PER_MINUTE then return s.v >= need(s, amount) end
  return s.u + s.l < s.limit
end

-- Milliseconds until `amount` fits: refill time of what is missing, or the
-- window's end. When only leases stand in the way (everything unleased is
-- gone but the bucket is not spent), they come back sooner: no lease is
-- granted while the unleased balance is this low, so each replica returns
-- its lease at its next sync, and a lease is never good beyond lease_ms.
local function wait_ms(s, amount, lease_ms)
  if s.kind == PER_MINUTE then
    local w = math.ceil(math.max(need(s, amount) - s.v, 0) * 60000 / s.limit)
    if s.l > 0 and s.limit - s.l <= 0 then w = math.min(w, lease_ms) end
    return w
  end
  if s.l > 0 and s.u < s.limit then return math.min(s.we - now, lease_ms) end
  return s.we - now
end

-- A debit (positive) or credit (negative). Per-minute balances may go into
-- debt and never above the unleased capacity; calendar usage never below 0.
local function charge(s, amount)
  if s.kind == PER_MINUTE then
    s.v = math.min(s.v - amount, s.limit - s.l)
  else
    s.u = math.max(s.u + amount, 0)
  end
end

-- Remaining (unleased) and reset time: when a per-minute bucket is full
-- again, when a calendar window ends.
local function view(s)
  if s.kind == PER_MINUTE then
    return s.v, now + math.ceil(math.max(s.limit - s.l - s.v, 0) * 60000 / s.limit)
  end
  return s.limit - s.u - s.l, s.we
end
