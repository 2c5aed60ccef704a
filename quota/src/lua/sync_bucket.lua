-- Sync of one bucket for one replica (one bucket per call, so it would
-- also run on Redis Cluster): the replica's outstanding lease comes back
-- minus what it consumed, then a new lease is granted.
-- KEYS: 1 tg:{tg}:b:<id>, 2 tg:{tg}:r:<id>, 3 tg:{tg}:replicas
-- ARGV: 1 test clock, 2 replica, 3 refill kind, 4 limit, 5 utc offset (min),
--       6 seq, 7 consumed, 8 want, 9 window of the consumption (calendar),
--       10 lease ms, 11 reclaim margin ms, 12 keep_ms, 13 active window ms
-- Reply: 'lease expires_at remaining reset_at window'.
local replica, kind = ARGV[2], tonumber(ARGV[3])
local seq, consumed, want = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local keep_ms = tonumber(ARGV[12])
local s = load(KEYS[1], KEYS[2], kind, tonumber(ARGV[4]), tonumber(ARGV[5]), true)

local function reply(rec)
  return table.concat({int(rec.g0), int(rec.e), fmt(rec.rem), int(rec.reset), int(rec.w)}, ' ')
end

local raw = redis.call('HGET', KEYS[2], replica)
local rec = raw and decode(raw)
if rec and seq <= rec.s then
  -- A retry (or a late duplicate): applied already, same answer.
  save(s, keep_ms)
  return reply(rec)
end

-- B += outstanding - consumed: consumed may exceed the lease (debt) or be
-- negative (refunds); a lease reclaimed meanwhile is no longer outstanding.
local outstanding = 0
if rec and rec.g > 0 and lease_live(s, rec) then outstanding = rec.g end
s.l = s.l - outstanding
if kind == PER_MINUTE then
  s.v = math.min(s.v + outstanding - consumed, s.limit - s.l)
elseif tonumber(ARGV[9]) == s.ws then
  s.u = math.max(s.u + consumed, 0)
end
-- (Calendar consumption for a window that has ended is dropped.)

-- The new lease: the amount asked, never more than the unleased balance,
-- and none once that balance is below one `want` per active replica, so
-- the last tokens go through Admit, which is exact.
local replicas = math.max(redis.call('ZCOUNT', KEYS[3], now - tonumber(ARGV[13]), '+inf'), 1)
local unleased
if kind == PER_MINUTE then unleased = s.v else unleased = s.limit - s.u - s.l end
local g = 0
if want > 0 and unleased >= replicas * want then g = math.min(want, math.floor(unleased)) end
s.l = s.l + g
if kind == PER_MINUTE then s.v = s.v - g end

local e = now + tonumber(ARGV[10])
rec = {s = seq, g = g, e = e, rc = e + tonumber(ARGV[11]), w = s.ws or 0, a = now, g0 = g}
if g > 0 and (s.x == 0 or rec.rc < s.x) then s.x = rec.rc end
rec.rem, rec.reset = view(s)
redis.call('HSET', KEYS[2], replica, encode(rec))
save(s, keep_ms)
return reply(rec)
