-- Reseed: a calendar bucket's use in its current window, from the audit
-- store, after Redis lost its data (`tollgate quota reseed --from-audit`).
-- Raises the window's use to the audited figure and never lowers it: what
-- Redis holds may also count reservations of requests still running.
-- KEYS: 1 tg:{tg}:b:<id>, 2 tg:{tg}:r:<id>
-- ARGV: 1 test clock, 2 keep_ms, 3 refill kind, 4 limit, 5 utc offset (min),
--       6 audited use in the current window (base units)
-- Reply: the window's use after the reseed.
local s = load(KEYS[1], KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), false)
if s.kind == PER_MINUTE then
  return redis.error_reply('ERR reseed: per-minute buckets refill on their own')
end
local used = tonumber(ARGV[6])
if used > s.u then s.u = used end
save(s, tonumber(ARGV[2]))
return int(s.u)
