-- Revoke: records a key hash with a new revocation epoch; revoking a key
-- twice keeps its first epoch.
-- KEYS: 1 tg:{tg}:epoch, 2 tg:{tg}:revoked
-- ARGV: 1 test clock (unused), 2 SHA-256 of the key
-- Reply: the key's epoch.
local known = redis.call('ZSCORE', KEYS[2], ARGV[2])
if known then return int(tonumber(known)) end
local epoch = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], epoch, ARGV[2])
return int(epoch)
