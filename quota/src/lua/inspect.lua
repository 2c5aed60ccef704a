-- Test only (tollgate_quota::testing::inspect): a bucket's stored state and
-- the sum of its live lease records, read without changing anything.
-- KEYS: 1 tg:{tg}:b:<id>, 2 tg:{tg}:r:<id>
-- Reply: 'balance_or_used leased sum_of_record_leases window'
local f = redis.call('HMGET', KEYS[1], 'k', 'v', 'u', 'l', 'w')
local kind = tonumber(f[1]) or 0
local w = tonumber(f[5]) or 0
local sum = 0
local all = redis.call('HGETALL', KEYS[2])
for i = 2, #all, 2 do
  local rec = decode(all[i])
  if kind == PER_MINUTE or rec.w == w then sum = sum + rec.g end
end
local value = f[2] or f[3] or '0'
return table.concat({value, f[4] or '0', int(sum), int(w)}, ' ')
