-- The clock of test scripts only (tollgate_quota::testing::ManualClock):
-- `now` is ARGV[1], in ms since the Unix epoch. Production scripts are built
-- with clock_redis.lua instead and never read it.
local now = tonumber(ARGV[1])
