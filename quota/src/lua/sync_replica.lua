-- Sync, once per SyncRequest (first in its pipeline): registers the
-- replica as active and returns the revocations newer than its epoch.
-- KEYS: 1 tg:{tg}:replicas, 2 tg:{tg}:revoked, 3 tg:{tg}:epoch
-- ARGV: 1 test clock, 2 replica, 3 the caller's epoch, 4 most revocations
--       to return, 5 active window (ms)
-- Reply: {now_ms, active replicas, epoch, key hash...}; epoch is the one up
-- to which the list is complete (the caller asks again from there).
redis.call('ZADD', KEYS[1], now, ARGV[2])
-- Replicas silent for an hour are forgotten.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
local active = redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[5]), '+inf')
local epoch = tonumber(redis.call('GET', KEYS[3]) or '0')
local since = tonumber(ARGV[3])
-- An epoch ahead of Redis means the revocation log was lost (a Redis
-- without persistence restarted): send everything there is again.
if since > epoch then since = 0 end
local max = tonumber(ARGV[4])
local list = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. int(since), '+inf', 'WITHSCORES',
  'LIMIT', 0, max)
if #list / 2 >= max then epoch = tonumber(list[#list]) end
local out = {int(now), int(active), int(epoch)}
for i = 1, #list, 2 do out[#out + 1] = list[i] end
return out
