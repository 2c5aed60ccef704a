-- The clock of production scripts: Redis TIME, one clock for every quota
-- replica and every Envoy. ARGV[1] is reserved for the test clock and
-- ignored here. Scripts that call TIME before writing replicate by effects
-- (the default since Redis 5), so replicas apply the same values.
local now
do
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
