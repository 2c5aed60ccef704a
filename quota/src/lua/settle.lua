-- Settle: signed deltas of one admitted request, applied once.
-- KEYS: 1 tg:{tg}:s:<request_id>, then per bucket: tg:{tg}:b:<id>, tg:{tg}:r:<id>
-- ARGV: 1 test clock, 2 marker TTL (s), 3 keep_ms, then per bucket:
--       refill kind, limit, utc offset (min), delta
-- Reply: '1' applied, '0' a duplicate (already settled).
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return '0' end
local keep_ms = tonumber(ARGV[3])
for i = 1, (#KEYS - 1) / 2 do
  local a = 4 + (i - 1) * 4
  local s = load(KEYS[2 * i], KEYS[1 + 2 * i], tonumber(ARGV[a]), tonumber(ARGV[a + 1]),
    tonumber(ARGV[a + 2]), false)
  charge(s, tonumber(ARGV[a + 3]))
  save(s, keep_ms)
end
return '1'
