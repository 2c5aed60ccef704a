-- Test only (tollgate_quota::testing::lua_windows): the calendar window
-- the scripts compute for given times, to check the Lua civil-date
-- arithmetic against core/src/time.rs.
-- ARGV: 1 test clock (unused), then triples: refill kind, time (ms), utc offset (min)
-- Reply: {'start end', ...}
local out = {}
for a = 2, #ARGV, 3 do
  local start, stop = window(tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]))
  out[#out + 1] = int(start) .. ' ' .. int(stop)
end
return out
