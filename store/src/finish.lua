-- End holds: settle them into the counts (accepted = 1) or drop them. Atomic.
-- ARGV: now_ms, accepted (1/0), then per (hold, counter): hold, window_ms, bucket_ms,
--       reserved (1/0), member ('' unless unique counting).
-- KEYS per (hold, counter): counts, held, the current bucket's HyperLogLog.
-- A batch of settlements (several holds on the same keys) costs one command per key: the
-- holds leave each sorted set in one ZREM, the units of a bucket are added in one HINCRBY,
-- the members of a HyperLogLog in one PFADD, and each key's expiry is set once.
local now = tonumber(ARGV[1])
local accepted = ARGV[2] == '1'
local leaving, units, members, expiry = {}, {}, {}, {}
local order = {}
local function seen(key)
  if expiry[key] == nil then
    expiry[key] = 0
    order[#order + 1] = key
  end
end
local a, k = 3, 1
while a <= #ARGV do
  local hold, window, bucket = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local reserved, member = ARGV[a + 3] == '1', ARGV[a + 4]
  a = a + 5
  local counts, held, hll = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  k = k + 3
  leaving[held] = leaving[held] or {}
  table.insert(leaving[held], hold)
  if accepted then
    local target
    if member ~= '' then
      target = hll
      members[hll] = members[hll] or {}
      table.insert(members[hll], member)
    elseif reserved then
      target = counts
      units[counts] = units[counts] or {}
      local b = math.floor(now / bucket)
      units[counts][b] = (units[counts][b] or 0) + 1
    end
    if target then
      seen(target)
      expiry[target] = math.max(expiry[target], window + bucket)
    end
  end
end
for held, holds in pairs(leaving) do
  redis.call('ZREM', held, unpack(holds))
end
for _, key in ipairs(order) do
  if members[key] then
    redis.call('PFADD', key, unpack(members[key]))
  else
    for b, n in pairs(units[key]) do
      redis.call('HINCRBY', key, b, n)
    end
  end
  redis.call('PEXPIRE', key, expiry[key])
end
return 0
