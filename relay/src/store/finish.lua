-- End holds: settle them into the counts (accepted = 1) or drop them. Atomic.
-- ARGV: now_ms, accepted (1/0), then per (hold, counter): hold, window_ms, bucket_ms,
--       reserved (1/0), member ('' unless unique counting).
-- KEYS per (hold, counter): counts, held, the current bucket's HyperLogLog.
local now = tonumber(ARGV[1])
local accepted = ARGV[2] == '1'
local a, k = 3, 1
while a <= #ARGV do
  local hold, window, bucket = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local reserved, member = ARGV[a + 3] == '1', ARGV[a + 4]
  a = a + 5
  local counts, held, hll = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  k = k + 3
  redis.call('ZREM', held, hold)
  if accepted then
    if member ~= '' then
      redis.call('PFADD', hll, member)
      redis.call('PEXPIRE', hll, window + bucket)
    elseif reserved then
      redis.call('HINCRBY', counts, math.floor(now / bucket), 1)
      redis.call('PEXPIRE', counts, window + bucket)
    end
  end
end
return 0
