-- Admit: all-or-nothing over a request's buckets.
-- KEYS: 1 tg:{tg}:a:<request_id> (the first answer, for retries)
--       2 tg:{tg}:revoked, then per bucket: tg:{tg}:b:<id>, tg:{tg}:r:<id>
-- ARGV: 1 test clock, 2 SHA-256 of the key ('' = no key), 3 answer TTL (s),
--       4 keep_ms, 5 lease ms, then per bucket: refill kind, limit, utc offset
--       (min), amount
-- Reply: 'outcome refused wait_ms now_ms' then 'remaining reset_at' per
-- bucket (outcome 1 admitted, 2 limited, 3 revoked).
local prior = redis.call('GET', KEYS[1])
if prior then return prior end

local function answer(reply)
  redis.call('SET', KEYS[1], reply, 'NX', 'EX', ARGV[3])
  return reply
end

if ARGV[2] ~= '' and redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  return answer(table.concat({'3', '0', '0', int(now)}, ' '))
end

local keep_ms, lease_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local n = (#KEYS - 2) / 2
local states, amounts = {}, {}
local worst, worst_wait = nil, -1
for i = 1, n do
  local a = 6 + (i - 1) * 4
  local s = load(KEYS[1 + 2 * i], KEYS[2 + 2 * i], tonumber(ARGV[a]), tonumber(ARGV[a + 1]),
    tonumber(ARGV[a + 2]), false)
  local amount = tonumber(ARGV[a + 3])
  states[i], amounts[i] = s, amount
  if not fits(s, amount) then
    -- The bucket that frees up last decides; the first one on a tie.
    local w = wait_ms(s, amount, lease_ms)
    if w > worst_wait then worst, worst_wait = i, w end
  end
end

local out
if worst then
  out = {'2', int(worst - 1), int(worst_wait), int(now)}
else
  for i = 1, n do charge(states[i], amounts[i]) end
  out = {'1', '0', '0', int(now)}
end
for i = 1, n do
  -- Saved on a refusal too: loading may have reclaimed leases or opened a
  -- new window, and lease records are already written.
  save(states[i], keep_ms)
  local rem, reset = view(states[i])
  out[#out + 1] = fmt(rem)
  out[#out + 1] = int(reset)
end
return answer(table.concat(out, ' '))
